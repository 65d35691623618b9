//! The backend, the model and its instances: names, configuration, state pointers,
//! lifecycle (a call on a finalized one is `use-after-finalize`).

#![allow(clippy::wildcard_imports)]

use super::*;

impl Ledger {
    // ----- backend, model, instances ---------------------------------------------------------

    /// Fails with `use-after-finalize` once the object's Finalize returned.
    pub(crate) fn entity_check(&mut self, func: &str, kind: Kind, i: usize) -> R<()> {
        let (life, name) = match kind {
            Kind::Backend => (self.backend.life, "the backend".to_string()),
            Kind::Model => (self.model.life, format!("model {}", self.config.name)),
            _ => (
                self.instances[i].e.life,
                format!("instance {}", self.instances[i].spec.name),
            ),
        };
        if life == Life::Finalized {
            let fini = match kind {
                Kind::Backend => "TRITONBACKEND_Finalize",
                Kind::Model => "TRITONBACKEND_ModelFinalize",
                _ => "TRITONBACKEND_ModelInstanceFinalize",
            };
            return Err(self.reject(
                "use-after-finalize",
                format!("{func} on {name} after {fini} returned"),
            ));
        }
        Ok(())
    }

    /// Checks a backend handle (live, not finalized).
    pub fn backend_check(&mut self, func: &str, h: usize) -> R<()> {
        self.index(func, h, Kind::Backend)?;
        self.entity_check(func, Kind::Backend, 0)
    }

    /// Checks a model handle (live, not finalized).
    pub fn model_check(&mut self, func: &str, h: usize) -> R<()> {
        self.index(func, h, Kind::Model)?;
        self.entity_check(func, Kind::Model, 0)
    }

    /// The instance a handle names, if it is live.
    pub fn instance_index(&mut self, func: &str, h: usize) -> R<usize> {
        let i = self.index(func, h, Kind::Instance)?;
        self.entity_check(func, Kind::Instance, i)?;
        Ok(i)
    }

    /// Where the backend is in its lifecycle (run.rs moves it along).
    pub fn set_life_backend(&mut self, life: Life) {
        self.backend.life = life;
    }
    /// Where the model is in its lifecycle.
    pub fn set_life_model(&mut self, life: Life) {
        self.model.life = life;
    }
    /// Where instance `i` is in its lifecycle.
    pub fn set_life_instance(&mut self, i: usize, life: Life) {
        self.instances[i].e.life = life;
    }
    /// How many instances the config gives.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }
    /// Instance `i`'s name (`<group>` or `<group>_<c>`).
    pub fn instance_name(&self, i: usize) -> &str {
        &self.instances[i].spec.name
    }

    /// `TRITONBACKEND_BackendName`.
    pub fn backend_name(&mut self, func: &str, h: usize) -> R<*const libc::c_char> {
        self.backend_check(func, h)?;
        Ok(self.backend.name.as_ptr())
    }

    /// `TRITONBACKEND_BackendConfig`: the host-owned message (must not be deleted).
    pub fn backend_config(&mut self, func: &str, h: usize) -> R<usize> {
        self.backend_check(func, h)?;
        Ok(handle(Kind::Message, self.backend_config))
    }

    /// `TRITONBACKEND_BackendExecutionPolicy`.
    pub fn backend_policy(&mut self, func: &str, h: usize) -> R<u32> {
        self.backend_check(func, h)?;
        Ok(self.exec_policy)
    }

    /// `TRITONBACKEND_BackendSetExecutionPolicy`: only inside `TRITONBACKEND_Initialize`.
    pub fn backend_set_policy(&mut self, func: &str, h: usize, policy: u32) -> R<()> {
        self.backend_check(func, h)?;
        if self.entry != Some("TRITONBACKEND_Initialize") {
            return Err(self.reject(
                "call-context",
                format!("{func} may only be called from TRITONBACKEND_Initialize"),
            ));
        }
        if policy > 1 {
            return Err(fail(
                code::INVALID_ARG,
                format!("unknown execution policy {policy}"),
            ));
        }
        self.exec_policy = policy;
        Ok(())
    }

    /// `TRITONBACKEND_BackendArtifacts`: the directory holding the library.
    pub fn backend_artifacts(&mut self, func: &str, h: usize) -> R<*const libc::c_char> {
        self.backend_check(func, h)?;
        Ok(self.backend_location.as_ptr())
    }

    /// `TRITONBACKEND_{Backend,Model,ModelInstance}State`.
    pub fn state_of(&mut self, func: &str, kind: Kind, h: usize) -> R<usize> {
        match kind {
            Kind::Backend => {
                self.backend_check(func, h)?;
                Ok(self.backend.state)
            }
            Kind::Model => {
                self.model_check(func, h)?;
                Ok(self.model.state)
            }
            _ => {
                let i = self.instance_index(func, h)?;
                Ok(self.instances[i].e.state)
            }
        }
    }

    /// `TRITONBACKEND_{Backend,Model,ModelInstance}SetState`.
    pub fn set_state_of(&mut self, func: &str, kind: Kind, h: usize, state: usize) -> R<()> {
        match kind {
            Kind::Backend => {
                self.backend_check(func, h)?;
                self.backend.state = state;
            }
            Kind::Model => {
                self.model_check(func, h)?;
                self.model.state = state;
            }
            _ => {
                let i = self.instance_index(func, h)?;
                self.instances[i].e.state = state;
            }
        }
        Ok(())
    }

    /// Whether a `TRITONBACKEND_GetBackendAttribute` call is running (its handle is valid only then).
    pub fn open_backend_attribute(&mut self, open: bool) {
        self.attribute_open = open;
    }

    /// Checks a backend-attribute handle: valid only inside `GetBackendAttribute`.
    pub fn backend_attribute(&mut self, func: &str, h: usize) -> R<()> {
        self.index(func, h, Kind::BackendAttribute)?;
        if !self.attribute_open {
            return Err(self.reject(
                "call-context",
                format!("{func} outside TRITONBACKEND_GetBackendAttribute"),
            ));
        }
        Ok(())
    }

    /// `TRITONBACKEND_BackendAttributeAddPreferredInstanceGroup` (recorded for the report).
    pub fn add_preferred_group(&mut self, kind: u32, count: u64, ids: Vec<u64>) {
        self.preferred_groups
            .push(json!({"kind": kind, "count": count, "device_ids": ids}));
    }

    /// `TRITONBACKEND_BackendAttributeSetParallelModelInstanceLoading` (recorded).
    pub fn set_parallel_loading(&mut self, on: bool) {
        self.parallel_instance_loading = Some(on);
    }

    /// `TRITONBACKEND_ModelName`.
    pub fn model_name(&mut self, func: &str, h: usize) -> R<*const libc::c_char> {
        self.model_check(func, h)?;
        Ok(self.model.name.as_ptr())
    }

    /// `TRITONBACKEND_ModelVersion`.
    pub fn model_version(&mut self, func: &str, h: usize) -> R<u64> {
        self.model_check(func, h)?;
        Ok(self.opts.version)
    }

    /// `TRITONBACKEND_ModelRepository`: `<repository>/<model>`.
    pub fn model_repository(&mut self, func: &str, h: usize) -> R<*const libc::c_char> {
        self.model_check(func, h)?;
        Ok(self.model_repository.as_ptr())
    }

    /// `TRITONBACKEND_ModelConfig`: a new message the backend owns.
    pub fn model_config(&mut self, func: &str, h: usize, version: u32) -> R<usize> {
        self.model_check(func, h)?;
        if version != 1 {
            return Err(fail(
                code::INVALID_ARG,
                format!("model configuration version {version} not supported, supported versions are: 1"),
            ));
        }
        let j = self.model_config_json.clone();
        let i = self.new_message(
            j,
            MsgOwner::Backend,
            "model configuration message (TRITONBACKEND_ModelConfig)",
        );
        Ok(handle(Kind::Message, i))
    }

    /// `TRITONBACKEND_ModelSetConfig`: only inside `ModelInitialize`; later `ModelConfig` calls return the new JSON.
    pub fn model_set_config(&mut self, func: &str, h: usize, version: u32, msg: usize) -> R<()> {
        self.model_check(func, h)?;
        let i = self.live_message(func, msg)?;
        if self.entry != Some("TRITONBACKEND_ModelInitialize") {
            return Err(fail(
                code::INTERNAL,
                format!("{func} can only be called from TRITONBACKEND_ModelInitialize"),
            ));
        }
        if version != 1 {
            return Err(fail(
                code::INVALID_ARG,
                format!("unsupported config version {version}"),
            ));
        }
        let j = self.messages[i].json.to_string_lossy().into_owned();
        self.warning(format!(
            "the backend replaced the model configuration with {func}: {j}"
        ));
        self.model_config_json = j;
        Ok(())
    }

    /// `TRITONBACKEND_{Model,ModelInstance}ReportMemoryUsage` (recorded).
    pub fn report_memory_usage(&mut self, func: &str, attrs: Vec<usize>) -> R<()> {
        let mut total = 0usize;
        for a in attrs {
            let i = self.live_attr(func, a)?;
            total += self.attrs[i].byte_size;
        }
        self.memory_usage
            .push(json!({"from": func, "bytes": total}));
        Ok(())
    }

    /// `TRITONBACKEND_ModelInstanceName`.
    pub fn instance_name_ptr(&mut self, func: &str, h: usize) -> R<*const libc::c_char> {
        let i = self.instance_index(func, h)?;
        Ok(self.instances[i].e.name.as_ptr())
    }

    /// `TRITONBACKEND_ModelInstanceKind`.
    pub fn instance_kind(&mut self, func: &str, h: usize) -> R<u32> {
        let i = self.instance_index(func, h)?;
        Ok(match self.instances[i].spec.kind.as_str() {
            "KIND_CPU" => 1,
            "KIND_GPU" => 2,
            "KIND_MODEL" => 3,
            _ => 0,
        })
    }

    /// `TRITONBACKEND_ModelInstanceDeviceId`.
    pub fn instance_device(&mut self, func: &str, h: usize) -> R<i32> {
        let i = self.instance_index(func, h)?;
        Ok(self.instances[i].spec.device_id)
    }

    /// `TRITONBACKEND_ModelInstanceHostPolicy`: a host-owned message.
    pub fn instance_host_policy(&mut self, func: &str, h: usize) -> R<usize> {
        let i = self.instance_index(func, h)?;
        Ok(handle(Kind::Message, self.instances[i].host_policy))
    }

    /// `TRITONBACKEND_ModelInstanceProfileName` (no profiles are configured).
    pub fn instance_profile(&mut self, func: &str, h: usize, index: u32) -> R<*const libc::c_char> {
        let i = self.instance_index(func, h)?;
        match self.instances[i].profiles.get(index as usize) {
            Some(p) => Ok(p.as_ptr()),
            None => Err(fail(
                code::INVALID_ARG,
                format!("out of bounds index {index}: instance has 0 profiles"),
            )),
        }
    }
}
