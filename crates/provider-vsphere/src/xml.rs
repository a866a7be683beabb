//! A small XML tree for vim25 SOAP responses, and escaping for the requests we write.
//!
//! Responses are parsed into [`Node`]s with namespaces resolved: element names are kept as local
//! names (everything in a vim25 body is `urn:vim25`), and the schema-instance `type` attribute is
//! recognised by its namespace, whatever prefix the server chose (`xsi:type` from vCenter,
//! `XMLSchema-instance:type` from vcsim).

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// XML Schema built-in types that appear as `xsi:type` values in vim25.
const XSD_TYPES: &[&str] = &[
    "string",
    "boolean",
    "byte",
    "short",
    "int",
    "long",
    "float",
    "double",
    "dateTime",
    "base64Binary",
    "anyType",
    "anyURI",
];

/// One element of a parsed response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    /// Local name of the element (`returnval`, `propSet`, …).
    pub name: String,
    /// The `xsi:type` attribute's local part, if any (`ManagedObjectReference`, `string`, …).
    pub xsi_type: Option<String>,
    /// The unqualified `type` attribute, which a managed object reference carries.
    pub mo_type: Option<String>,
    /// Concatenated text directly inside this element.
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    /// The first child with this local name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// All children with this local name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Follows a path of child names.
    pub fn path(&self, names: &[&str]) -> Option<&Node> {
        names.iter().try_fold(self, |n, name| n.child(name))
    }

    /// The text of the child with this name.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// Writes the element back as XML (for sending an object we read, e.g. a device, back to
    /// vCenter). Types are written with the `xsi` prefix, XML Schema types as `xsd:…`.
    pub fn to_xml(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        if let Some(t) = &self.xsi_type {
            let prefix = if XSD_TYPES.contains(&t.as_str()) {
                "xsd:"
            } else {
                ""
            };
            out.push_str(&format!(" xsi:type=\"{prefix}{}\"", esc(t)));
        }
        if let Some(t) = &self.mo_type {
            out.push_str(&format!(" type=\"{}\"", esc(t)));
        }
        out.push('>');
        out.push_str(&esc(&self.text));
        for c in &self.children {
            c.to_xml(out);
        }
        out.push_str(&format!("</{}>", self.name));
    }

    /// Every descendant (depth first) with this local name.
    pub fn descendants<'a>(&'a self, name: &str, out: &mut Vec<&'a Node>) {
        for c in &self.children {
            if c.name == name {
                out.push(c);
            }
            c.descendants(name, out);
        }
    }
}

/// Parses a whole document and returns its root element.
pub fn parse(doc: &str) -> Result<Node, String> {
    let mut reader = NsReader::from_str(doc);
    let mut stack: Vec<Node> = Vec::new();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("malformed XML at byte {}: {e}", reader.buffer_position()))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let mut node = Node {
                    name: e.local_name().as_ref().to_string(),
                    ..Node::default()
                };
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| format!("malformed XML attribute: {e}"))?;
                    let (ns, local) = reader.resolver().resolve_attribute(attr.key);
                    if local.as_ref() != "type" {
                        continue;
                    }
                    let value = attr
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|e| format!("malformed XML attribute value: {e}"))?
                        .into_owned();
                    match ns {
                        ResolveResult::Bound(ns) if ns.as_ref() == XSI_NS => {
                            // A QName: keep the local part (`xsd:string` -> `string`).
                            let local = value.rsplit(':').next().unwrap_or(&value);
                            node.xsi_type = Some(local.to_string());
                        }
                        ResolveResult::Unbound => node.mo_type = Some(value),
                        _ => {}
                    }
                }
                if matches!(event, Event::Empty(_)) {
                    attach(&mut stack, node);
                } else {
                    stack.push(node);
                }
            }
            Event::End(_) => {
                let node = stack.pop().ok_or("malformed XML: unbalanced end tag")?;
                if stack.is_empty() {
                    return Ok(node);
                }
                attach(&mut stack, node);
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let t = t.xml10_content();
                    // Whitespace between child elements is layout, not content.
                    if !t.trim().is_empty() || !top.text.is_empty() {
                        top.text.push_str(&t);
                    }
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t);
                }
            }
            Event::GeneralRef(r) => {
                let entity = format!("&{};", r.xml10_content());
                let text = quick_xml::escape::unescape(&entity)
                    .map_err(|e| format!("malformed XML entity {entity}: {e}"))?;
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&text);
                }
            }
            Event::Eof => return Err("malformed XML: document ended early".into()),
            _ => {}
        }
    }
}

fn attach(stack: &mut [Node], node: Node) {
    if let Some(parent) = stack.last_mut() {
        parent.children.push(node);
    }
}

/// Escapes text for element content and attribute values.
pub fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_type_attribute_by_namespace() {
        let vcsim = r#"<?xml version="1.0"?><Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body><R xmlns="urn:vim25"><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="VirtualMachinePowerState">poweredOn</val><obj type="VirtualMachine">vm-1</obj></R></Body></Envelope>"#;
        let vc = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><R xmlns="urn:vim25"><val xsi:type="VirtualMachinePowerState">poweredOn</val><obj type="VirtualMachine">vm-1</obj></R></soapenv:Body></soapenv:Envelope>"#;
        for doc in [vcsim, vc] {
            let root = parse(doc).unwrap();
            let r = root.path(&["Body", "R"]).unwrap();
            let val = r.child("val").unwrap();
            assert_eq!(val.xsi_type.as_deref(), Some("VirtualMachinePowerState"));
            assert_eq!(val.mo_type, None);
            assert_eq!(val.text, "poweredOn");
            let obj = r.child("obj").unwrap();
            assert_eq!(obj.mo_type.as_deref(), Some("VirtualMachine"));
            assert_eq!(obj.text, "vm-1");
        }
    }

    #[test]
    fn unescapes_entities_and_escapes_back() {
        let root = parse("<a>x &amp; y &lt;z&gt; &#65;</a>").unwrap();
        assert_eq!(root.text, "x & y <z> A");
        assert_eq!(esc("a<b&\"c'"), "a&lt;b&amp;&quot;c&apos;");
    }

    #[test]
    fn rejects_truncated_documents() {
        assert!(parse("<a><b>").is_err());
    }
}
