//! The do-nothing test provider: records calls, optionally sleeps or fails on command.
//! It never makes a machine; it exists so admission and engine behaviour can be tested and
//! benchmarked without a hypervisor. It is selected only by `provider = "null"` in the config.

use crate::{MachineState, Provider, ProviderError, Result, VmRequest};
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
    calls: Mutex<Vec<NullProviderCall>>,
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

    async fn record(&self, phase: &'static str, vm: &VmRequest) -> Result<()> {
        self.calls.lock().unwrap().push(NullProviderCall {
            phase,
            instance: vm.instance.clone(),
            at: Instant::now(),
        });
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

#[async_trait::async_trait]
impl Provider for NullProvider {
    fn kind(&self) -> &'static str {
        "null"
    }
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
