//! The do-nothing test provider: records calls, optionally sleeps or fails on command.
//! It never makes a machine; it exists so admission and engine behaviour can be tested and
//! benchmarked without a hypervisor. It is selected only by `provider = "null"` in the config.

use crate::{MachineState, Provider, ProviderError, Result, VmRequest};
use std::collections::HashMap;
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
    calls: Mutex<Vec<NullProviderCall>>,
    state: Mutex<HashMap<String, MachineState>>,
}

impl NullProvider {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
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
        if self.fail_phase == Some(phase) && vm.name.as_str().starts_with("fail-") {
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
