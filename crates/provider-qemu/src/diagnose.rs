//! Explaining from the serial console log why a guest did not answer SSH.

use crate::net::Probe;
use std::net::Ipv4Addr;

/// Why a guest is not ready, as far as its console and our probes tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnosis {
    /// The console stayed empty: firmware, kernel or initrd never ran (or the host is too slow).
    NoSerialOutput,
    /// The guest wrote to its console but cloud-init never reported its network configured.
    NoNetwork,
    /// The network came up (cloud-init said so) but sshd was never set up.
    NoSshd,
    /// The guest's address answered with a TCP reset: it is up, but nothing listens on port 22.
    SshdRefused,
    /// The guest reports network and sshd, yet port 22 gave no answer from our side.
    Unreachable,
}

impl Diagnosis {
    /// One sentence for the user: what happened and what to check.
    pub fn explain(&self, ip: Ipv4Addr) -> String {
        match self {
            Diagnosis::NoSerialOutput => "no serial output at all: the guest kernel did not start \
                 (check the image's vmlinuz/initrd and the accelerator; under TCG a loaded host is \
                 slow)"
                .to_string(),
            Diagnosis::NoNetwork => format!(
                "the kernel booted but the guest network did not come up: cloud-init reported no \
                 network for {ip} (check the seed's network-config and that the MAC matches)"
            ),
            Diagnosis::NoSshd => format!(
                "the kernel booted and cloud-init configured {ip}, but sshd was never set up \
                 (check the image has openssh-server and cloud-init's ssh module ran)"
            ),
            Diagnosis::SshdRefused => format!(
                "{ip} is up but refuses connections on port 22: sshd is not running in the guest"
            ),
            Diagnosis::Unreachable => format!(
                "the guest reports network and sshd up, but {ip}:22 never answered (check the \
                 gateway/prefix on the bridge and the tap)"
            ),
        }
    }
}

/// Diagnoses from the console text and the outcome of the last connection attempt.
pub fn diagnose(serial: &str, ip: Ipv4Addr, last_probe: Option<&Probe>) -> Diagnosis {
    if matches!(last_probe, Some(Probe::Refused)) {
        return Diagnosis::SshdRefused;
    }
    if serial
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .is_empty()
    {
        return Diagnosis::NoSerialOutput;
    }
    let ip = ip.to_string();
    // cloud-init prints its "Net device info" table once the network is configured.
    let network = serial
        .lines()
        .any(|l| l.contains("ci-info: |") && l.contains(&format!(" {ip} ")));
    if !network {
        return Diagnosis::NoNetwork;
    }
    // cloud-init's ssh module generates the host keys (before sshd starts) and prints them at the
    // end; systemd reports sshd itself only without `quiet`.
    let sshd = serial.contains("/etc/ssh/ssh_host_")
        || serial.contains("BEGIN SSH HOST KEY")
        || serial.contains("OpenBSD Secure Shell server")
        || serial.contains("ssh.service");
    if !sshd {
        return Diagnosis::NoSshd;
    }
    Diagnosis::Unreachable
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 10);

    const KERNEL_ONLY: &str = "basphere-initrd: kernel up, mounting /dev/vda\n\
        [   19.741226] cloud-init[247]: Cloud-init v. 22.4.2 running 'init-local' at Sun, 22 Nov 2026 04:11:38 +0000. Up 19.51 seconds.\n";

    const NETWORK_UP: &str = "[   38.662441] cloud-init[268]: Cloud-init v. 22.4.2 running 'init' at Sun, 22 Nov 2026 04:11:57 +0000. Up 38.50 seconds.\n\
        [   38.861690] cloud-init[268]: ci-info: +++++++++++++++++++++++++++++++++++++++Net device info+++++++++++++++++++++++++++++++++++++++\n\
        [   38.884606] cloud-init[268]: ci-info: | Device |  Up  |           Address            |      Mask     | Scope  |     Hw-Address    |\n\
        [   38.897576] cloud-init[268]: ci-info: |  eth0  | True |         10.254.0.10          | 255.255.255.0 | global | 52:54:b2:9c:b6:43 |\n";

    // As printed by the debian-12 image under TCG.
    const HOST_KEYS: &str = "[   41.147004] cloud-init[268]: Generating public/private ed25519 key pair.\n\
        [   41.153545] cloud-init[268]: Your identification has been saved in /etc/ssh/ssh_host_ed25519_key\n";

    #[test]
    fn empty_console_means_no_boot() {
        assert_eq!(diagnose("", IP, None), Diagnosis::NoSerialOutput);
        assert_eq!(
            diagnose("\0\n  \n", IP, Some(&Probe::NoAnswer("timed out".into()))),
            Diagnosis::NoSerialOutput
        );
        assert!(
            Diagnosis::NoSerialOutput
                .explain(IP)
                .contains("no serial output")
        );
    }

    #[test]
    fn booted_without_network_or_sshd() {
        assert_eq!(diagnose(KERNEL_ONLY, IP, None), Diagnosis::NoNetwork);
        // A table for another address is not ours.
        let other = NETWORK_UP.replace("10.254.0.10", "10.254.0.11");
        assert_eq!(diagnose(&other, IP, None), Diagnosis::NoNetwork);
        assert_eq!(diagnose(NETWORK_UP, IP, None), Diagnosis::NoSshd);
        assert!(
            Diagnosis::NoNetwork
                .explain(IP)
                .contains("network did not come up")
        );
    }

    #[test]
    fn refused_connections_mean_sshd_is_down() {
        let log = format!("{KERNEL_ONLY}{NETWORK_UP}");
        assert_eq!(
            diagnose(&log, IP, Some(&Probe::Refused)),
            Diagnosis::SshdRefused
        );
        assert!(Diagnosis::SshdRefused.explain(IP).contains("refuses"));
    }

    #[test]
    fn everything_up_but_silent_is_unreachable() {
        let log = format!("{KERNEL_ONLY}{NETWORK_UP}{HOST_KEYS}");
        assert_eq!(
            diagnose(&log, IP, Some(&Probe::NoAnswer("timed out".into()))),
            Diagnosis::Unreachable
        );
    }
}
