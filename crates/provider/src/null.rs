//! The do-nothing test provider: records calls, optionally sleeps or fails on command.
//! It never makes a machine; it exists so admission and engine behaviour can be tested and
//! benchmarked without a hypervisor. It is selected only by `provider = "null"` in the config.
//! It also offers [`NodeCommands`], answering every command with [`NullProvider::command_output`].

use crate::{
    CommandOutput, MachineState, Machines, NodeCommand, NodeCommands, NodeRef, Provider,
    ProviderError, Result, VmRequest,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One call the test provider received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullProviderCall {
    pub phase: &'static str,
    pub instance: String,
    pub at: Instant,
}

/// A provider that does nothing but remember what it was asked (see module docs).
#[derive(Debug, Default)]
pub struct NullProvider {
    /// Sleep this long in every phase.
    pub delay: Duration,
    /// Phase name → fail permanently when called for a VM whose name starts with `fail-`.
    pub fail_phase: Option<&'static str>,
    /// A file of phase names, one a line, read at every call: those phases fail permanently
    /// for `fail-*` VMs while they are listed (a test turns a failure on and off while the
    /// server runs). [`NullProvider::new`] takes it from `BASPHERE_NULL_FAIL_FILE`.
    pub fail_file: Option<PathBuf>,
    /// What every [`NodeCommands::run`] returns (default: exit 0, no output).
    pub command_output: CommandOutput,
    calls: Mutex<Vec<NullProviderCall>>,
    /// Woken at every call recorded ([`NullProvider::called`] waits on it).
    recorded: tokio::sync::Notify,
    state: Mutex<HashMap<String, MachineState>>,
}

impl NullProvider {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            fail_file: std::env::var_os("BASPHERE_NULL_FAIL_FILE").map(PathBuf::from),
            ..Self::default()
        }
    }

    /// Whether `phase` is told to fail (see `fail_phase` and `fail_file`).
    fn fails(&self, phase: &str) -> bool {
        self.fail_phase == Some(phase)
            || self.fail_file.as_ref().is_some_and(|f| {
                std::fs::read_to_string(f).is_ok_and(|t| t.lines().any(|l| l.trim() == phase))
            })
    }

    /// The calls received so far.
    pub fn calls(&self) -> Vec<NullProviderCall> {
        self.calls.lock().unwrap().clone()
    }

    /// When `instance` was first asked for `phase`, waiting until it is: a watcher costs
    /// nothing while it waits (unlike polling [`NullProvider::calls`], which copies them all).
    pub async fn called(&self, instance: &str, phase: &str) -> Instant {
        loop {
            let mut woken = std::pin::pin!(self.recorded.notified());
            woken.as_mut().enable();
            let at = self
                .calls
                .lock()
                .unwrap()
                .iter()
                .find(|c| c.instance == instance && c.phase == phase)
                .map(|c| c.at);
            if let Some(at) = at {
                return at;
            }
            woken.await;
        }
    }

    async fn record(&self, phase: &'static str, vm: &VmRequest) -> Result<()> {
        self.calls.lock().unwrap().push(NullProviderCall {
            phase,
            instance: vm.instance.clone(),
            at: Instant::now(),
        });
        self.recorded.notify_waiters();
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if vm.name.as_str().starts_with("fail-") && self.fails(phase) {
            return Err(ProviderError::permanent(format!(
                "null provider: {phase} fails for {} as configured",
                vm.name
            )));
        }
        Ok(())
    }

    fn set(&self, vm: &VmRequest, s: MachineState) {
        self.state.lock().unwrap().insert(vm.instance.clone(), s);
    }
}

impl Provider for NullProvider {
    fn kind(&self) -> &'static str {
        "null"
    }
    fn commands(&self) -> Option<&dyn NodeCommands> {
        Some(self)
    }
    fn readiness(&self) -> crate::ReadinessFuture<'_> {
        Box::pin(async {
            vec![crate::Check::ok(
                "provider",
                "null: the do-nothing test provider makes no machines",
            )]
        })
    }
}

/// Records a `run` call (phase `"run"`, the node's instance) and returns the canned output.
#[async_trait::async_trait]
impl NodeCommands for NullProvider {
    async fn run(&self, node: &NodeRef, _cmd: &NodeCommand) -> Result<CommandOutput> {
        self.calls.lock().unwrap().push(NullProviderCall {
            phase: "run",
            instance: node.instance.clone(),
            at: Instant::now(),
        });
        Ok(self.command_output.clone())
    }
}

#[async_trait::async_trait]
impl Machines for NullProvider {
    async fn prepare(&self, vm: &VmRequest) -> Result<()> {
        self.record("prepare", vm).await?;
        self.set(vm, MachineState::Stopped);
        Ok(())
    }
    async fn start(&self, vm: &VmRequest) -> Result<()> {
        self.record("start", vm).await?;
        self.set(vm, MachineState::Running);
        Ok(())
    }
    async fn wait_ready(&self, vm: &VmRequest, _deadline: Duration) -> Result<()> {
        self.record("wait_ready", vm).await
    }
    async fn stop(&self, vm: &VmRequest) -> Result<()> {
        self.record("stop", vm).await?;
        let mut st = self.state.lock().unwrap();
        if let Some(s) = st.get_mut(&vm.instance) {
            *s = MachineState::Stopped;
        }
        Ok(())
    }
    async fn remove(&self, vm: &VmRequest) -> Result<()> {
        self.record("remove", vm).await?;
        self.state.lock().unwrap().remove(&vm.instance);
        Ok(())
    }
    async fn inspect(&self, vm: &VmRequest) -> Result<MachineState> {
        Ok(*self
            .state
            .lock()
            .unwrap()
            .get(&vm.instance)
            .unwrap_or(&MachineState::Absent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeRef {
        NodeRef {
            address: "127.0.0.1:22".parse().unwrap(),
            login_user: "basphere".into(),
            instance: "3f2a".into(),
        }
    }

    #[tokio::test]
    async fn null_provider_runs_commands_with_the_canned_output() {
        let canned = CommandOutput {
            exit_code: Some(3),
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
        };
        let p = NullProvider {
            command_output: canned.clone(),
            ..NullProvider::new(Duration::ZERO)
        };
        let provider: &dyn Provider = &p;
        let commands = provider
            .commands()
            .expect("the null provider offers NodeCommands");
        let cmd = NodeCommand::new("systemctl", ["start", "svc"], Duration::from_secs(5))
            .with_stdin("input");
        assert_eq!(cmd.argv(), ["systemctl", "start", "svc"]);
        let out = commands.run(&node(), &cmd).await.unwrap();
        assert_eq!(out, canned);
        assert!(!out.success());
        let calls = p.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].phase, calls[0].instance.as_str()),
            ("run", "3f2a")
        );
    }

    #[tokio::test]
    async fn null_provider_command_output_defaults_to_success() {
        let p = NullProvider::new(Duration::ZERO);
        let cmd = NodeCommand::new("true", Vec::<String>::new(), Duration::from_secs(1));
        let out = p.run(&node(), &cmd).await.unwrap();
        assert!(out.success());
        assert!(out.stdout.is_empty() && out.stderr.is_empty());
    }
}
