//! Response factories, responses and their outputs: creation order, buffers, `ResponseSend`,
//! the FINAL rules; plus the memory manager and buffer attributes.

#![allow(clippy::wildcard_imports)]

use super::*;

impl Ledger {
    // ----- factories and responses ------------------------------------------------------------

    /// `TRITONBACKEND_ResponseFactoryNew`: a factory the backend must delete.
    pub fn factory_new(&mut self, func: &str, req: usize) -> R<usize> {
        let r = self.live_request(func, req)?;
        self.factories.push(FactoryObj {
            request: r,
            deleted: false,
        });
        let f = self.factories.len() - 1;
        self.requests[r].factories.push(f);
        Ok(handle(Kind::Factory, f))
    }

    /// A factory not yet deleted (its request may be released: that is what factories are for).
    pub(crate) fn live_factory(&mut self, func: &str, h: usize) -> R<usize> {
        let f = self.index(func, h, Kind::Factory)?;
        if self.factories[f].deleted {
            let what = format!(
                "{func} on the response factory of {} after TRITONBACKEND_ResponseFactoryDelete",
                self.request_label(self.factories[f].request)
            );
            return Err(self.reject("use-after-delete", what));
        }
        Ok(f)
    }

    /// `TRITONBACKEND_ResponseFactoryDelete`.
    pub fn factory_delete(&mut self, func: &str, h: usize) -> R<()> {
        let f = self.live_factory(func, h)?;
        self.factories[f].deleted = true;
        self.changed = true;
        Ok(())
    }

    /// `TRITONBACKEND_ResponseFactoryIsCancelled`.
    pub fn factory_is_cancelled(&mut self, func: &str, h: usize) -> R<bool> {
        let f = self.live_factory(func, h)?;
        Ok(self.requests[self.factories[f].request].cancelled)
    }

    /// `TRITONBACKEND_ResponseFactorySendFlags`: a FINAL without a response.
    pub fn factory_send_flags(&mut self, func: &str, h: usize, flags: u32) -> R<()> {
        let f = self.live_factory(func, h)?;
        let r = self.factories[f].request;
        self.check_flags(func, r, flags);
        if flags == 0 {
            // No response and no flag: nothing reaches the client.
            return Ok(());
        }
        let rec = ResponseRecord {
            t_ms: self.elapsed_ms(),
            source: "backend-flags",
            flags,
            is_final: flags & FLAG_FINAL != 0,
            error: None,
            outputs: BTreeMap::new(),
            parameters: BTreeMap::new(),
        };
        self.deliver(r, rec);
        Ok(())
    }

    /// Only `TRITONSERVER_RESPONSE_COMPLETE_FINAL` is a known send flag.
    pub(crate) fn check_flags(&mut self, func: &str, r: usize, flags: u32) {
        if flags & !FLAG_FINAL != 0 {
            let what = format!(
                "{func} for {} with unknown flag bits {flags:#x}",
                self.request_label(r)
            );
            self.violation("send-flags", what);
        }
    }

    /// `ResponseNew` / `ResponseNewFromFactory`.
    pub fn response_new(&mut self, func: &str, h: usize, from_factory: bool) -> R<usize> {
        let r = if from_factory {
            let f = self.live_factory(func, h)?;
            self.factories[f].request
        } else {
            self.live_request(func, h)?
        };
        if let Some(&prev) = self.requests[r].made.last() {
            if self.responses[prev].state == RespState::Building {
                let missing: Vec<String> = self.responses[prev]
                    .outputs
                    .iter()
                    .filter(|&&o| self.outputs[o].buffer.is_none())
                    .map(|&o| self.outputs[o].name.to_string_lossy().into_owned())
                    .collect();
                if !missing.is_empty() {
                    let what = format!(
                        "{func}: a new response for {} was created before the buffers of \
                         output(s) {missing:?} of its response #{} were allocated",
                        self.request_label(r),
                        self.responses[prev].ordinal
                    );
                    self.violation("response-order", what);
                }
            }
        }
        let ordinal = self.requests[r].made.len() + 1;
        self.responses.push(ResponseObj {
            request: r,
            ordinal,
            state: RespState::Building,
            outputs: vec![],
            params: BTreeMap::new(),
        });
        let i = self.responses.len() - 1;
        self.requests[r].made.push(i);
        Ok(handle(Kind::Response, i))
    }

    /// `response #k of request '<id>'`, for messages.
    pub(crate) fn response_label(&self, i: usize) -> String {
        format!(
            "response #{} of {}",
            self.responses[i].ordinal,
            self.request_label(self.responses[i].request)
        )
    }

    /// A response neither sent nor deleted.
    pub(crate) fn building_response(&mut self, func: &str, h: usize) -> R<usize> {
        let i = self.index(func, h, Kind::Response)?;
        match self.responses[i].state {
            RespState::Building => Ok(i),
            RespState::Sent => {
                let what = format!(
                    "{func} on {} after TRITONBACKEND_ResponseSend",
                    self.response_label(i)
                );
                Err(self.reject("use-after-send", what))
            }
            RespState::Deleted => {
                let what = format!(
                    "{func} on {} after TRITONBACKEND_ResponseDelete",
                    self.response_label(i)
                );
                Err(self.reject("use-after-delete", what))
            }
        }
    }

    /// `TRITONBACKEND_ResponseDelete`: ends the response without sending it.
    pub fn response_delete(&mut self, func: &str, h: usize) -> R<()> {
        let i = self.building_response(func, h)?;
        self.responses[i].state = RespState::Deleted;
        self.retire_outputs(i);
        Ok(())
    }

    /// Makes the output buffers of response `i` inaccessible (its lifetime ended).
    pub(crate) fn retire_outputs(&mut self, i: usize) {
        let label = self.response_label(i);
        for o in self.responses[i].outputs.clone() {
            let what = format!(
                "output '{}' of {label}",
                self.outputs[o].name.to_string_lossy()
            );
            if let Some(b) = &mut self.outputs[o].buffer {
                b.retire(Region::SentOutput, &what);
            }
        }
    }

    /// `TRITONBACKEND_ResponseSet{String,Int,Bool,Double}Parameter`.
    pub fn response_set_parameter(
        &mut self,
        func: &str,
        h: usize,
        name: String,
        value: Json,
    ) -> R<()> {
        let i = self.building_response(func, h)?;
        self.responses[i].params.insert(name, value);
        Ok(())
    }

    /// `TRITONBACKEND_ResponseOutput`: the new output's handle.
    pub fn response_output(
        &mut self,
        func: &str,
        h: usize,
        name: &str,
        datatype: u32,
        shape: Vec<i64>,
    ) -> R<usize> {
        let i = self.building_response(func, h)?;
        let r = self.responses[i].request;
        if self.requests[r].made.last() != Some(&i) {
            let what = format!(
                "{func}: output '{name}' added to {} after a newer response for the same \
                 request was created (all outputs of a response come before the next response)",
                self.response_label(i)
            );
            self.violation("response-order", what);
        }
        let Some(declared) = self.config.output(name).cloned() else {
            return Err(fail(
                code::INVALID_ARG,
                format!(
                    "unexpected inference output '{name}' for model '{}'",
                    self.config.name
                ),
            ));
        };
        if self.responses[i]
            .outputs
            .iter()
            .any(|&o| self.outputs[o].name.to_bytes() == name.as_bytes())
        {
            let what = format!(
                "{func}: output '{name}' added twice to {}",
                self.response_label(i)
            );
            return Err(self.reject("duplicate-output", what));
        }
        let dname = spec::datatype_name(datatype);
        if dname != declared.datatype {
            let what = format!(
                "output '{name}' of {} has data type {dname}, the config declares {}",
                self.response_label(i),
                declared.datatype
            );
            self.warning(what);
        }
        if !self.requests[r]
            .requested
            .iter()
            .any(|s| s.to_bytes() == name.as_bytes())
        {
            let what = format!(
                "output '{name}' added to {}, which did not request it",
                self.response_label(i)
            );
            self.warning(what);
        }
        if shape.iter().any(|&d| d < 0) {
            let what = format!(
                "{func}: output '{name}' of {} has shape {shape:?}",
                self.response_label(i)
            );
            return Err(self.reject("output-shape", what));
        }
        self.outputs.push(OutputObj {
            response: i,
            name: cstring(name),
            datatype,
            shape,
            buffer: None,
            attrs: None,
        });
        let o = self.outputs.len() - 1;
        self.responses[i].outputs.push(o);
        Ok(handle(Kind::Output, o))
    }

    /// An output whose response is still being built.
    pub(crate) fn live_output(&mut self, func: &str, h: usize) -> R<usize> {
        let o = self.index(func, h, Kind::Output)?;
        let resp = handle(Kind::Response, self.outputs[o].response);
        self.building_response(func, resp)?;
        Ok(o)
    }

    /// `TRITONBACKEND_OutputBuffer`: the buffer (always CPU memory, id 0).
    pub fn output_buffer(&mut self, func: &str, h: usize, size: u64) -> R<*mut libc::c_void> {
        let o = self.live_output(func, h)?;
        let name = self.outputs[o].name.to_string_lossy().into_owned();
        if self.outputs[o].buffer.is_some() {
            return Err(fail(
                code::ALREADY_EXISTS,
                format!("allocated buffer for output '{name}' already exists"),
            ));
        }
        let (dt, shape) = (self.outputs[o].datatype, self.outputs[o].shape.clone());
        let es = spec::element_size(dt) as u64;
        let label = format!(
            "output '{name}' of {}",
            self.response_label(self.outputs[o].response)
        );
        if es > 0 {
            let need = spec::element_count(&shape).and_then(|n| n.checked_mul(es));
            if need != Some(size) {
                self.violation(
                    "output-size",
                    format!(
                        "{func}: {label} has shape {shape:?} of {} ({need:?} bytes) but asks for \
                         {size} bytes",
                        spec::datatype_name(dt)
                    ),
                );
            }
        }
        let Ok(len) = usize::try_from(size) else {
            return Err(fail(code::INVALID_ARG, format!("{size} bytes")));
        };
        if len > 1 << 32 {
            return Err(fail(
                code::UNAVAILABLE,
                format!("refusing to allocate {size} bytes"),
            ));
        }
        let b = GuardBuf::new(len, &label);
        let p = b.ptr();
        self.outputs[o].buffer = Some(b);
        Ok(p)
    }

    /// `TRITONBACKEND_OutputBufferAttributes`: attributes owned by the output.
    pub fn output_buffer_attributes(&mut self, func: &str, h: usize) -> R<usize> {
        let o = self.live_output(func, h)?;
        let Some(size) = self.outputs[o].buffer.as_ref().map(GuardBuf::len) else {
            return Err(fail(
                code::INVALID_ARG,
                "TRITONBACKEND_OutputBufferAttributes before TRITONBACKEND_OutputBuffer",
            ));
        };
        if let Some(a) = self.outputs[o].attrs {
            return Ok(handle(Kind::BufferAttributes, a));
        }
        self.attrs.push(AttrObj {
            owner: AttrOwner::Output(o),
            memory_type: 0,
            memory_type_id: 0,
            byte_size: size,
            ipc: 0,
            deleted: false,
        });
        let a = self.attrs.len() - 1;
        self.outputs[o].attrs = Some(a);
        Ok(handle(Kind::BufferAttributes, a))
    }

    /// `TRITONBACKEND_InferenceResponseOutput[ByName]`: name, datatype, shape, dims.
    pub fn response_output_info(
        &mut self,
        func: &str,
        h: usize,
        index: Option<u32>,
        name: Option<&str>,
    ) -> R<(*const libc::c_char, u32, *const i64, u64)> {
        let i = self.building_response(func, h)?;
        let outs = self.responses[i].outputs.clone();
        let found = match (index, name) {
            (Some(ix), _) => outs.get(ix as usize).copied().ok_or_else(|| {
                fail(
                    code::INVALID_ARG,
                    format!(
                        "out of bounds index {ix}: response has {} outputs",
                        outs.len()
                    ),
                )
            })?,
            (None, Some(n)) => outs
                .iter()
                .copied()
                .find(|&o| self.outputs[o].name.to_bytes() == n.as_bytes())
                .ok_or_else(|| fail(code::NOT_FOUND, format!("Output name {n}not found.")))?,
            (None, None) => return Err(fail(code::INVALID_ARG, "no output named")),
        };
        let o = &self.outputs[found];
        Ok((
            o.name.as_ptr(),
            o.datatype,
            o.shape.as_ptr(),
            o.shape.len() as u64,
        ))
    }

    /// `TRITONBACKEND_ResponseSend`.
    pub fn response_send(&mut self, func: &str, h: usize, flags: u32, err: usize) -> R<()> {
        let i = self.building_response(func, h)?;
        let error = if err == 0 {
            None
        } else {
            let e = self.live_error(func, err)?;
            Some(ErrorInfo {
                code: code_name(self.errors[e].code),
                message: self.errors[e].msg.to_string_lossy().into_owned(),
            })
        };
        let r = self.responses[i].request;
        self.check_flags(func, r, flags);
        let label = self.response_label(i);
        let mut outputs = BTreeMap::new();
        for o in self.responses[i].outputs.clone() {
            let name = self.outputs[o].name.to_string_lossy().into_owned();
            let (dt, shape) = (self.outputs[o].datatype, self.outputs[o].shape.clone());
            let Some(buf) = &self.outputs[o].buffer else {
                self.violation(
                    "output-buffer",
                    format!("{func}: output '{name}' of {label} has no buffer (TRITONBACKEND_OutputBuffer was not called)"),
                );
                continue;
            };
            let overrun = buf.overrun().then(|| buf.len());
            let (data, problem) = spec::decode_tensor(dt, &shape, buf.bytes());
            if let Some(len) = overrun {
                self.violation(
                    "output-size",
                    format!("output '{name}' of {label}: bytes written past the end of its {len}-byte buffer"),
                );
            }
            if let Some(p) = problem {
                self.violation("output-content", format!("output '{name}' of {label}: {p}"));
            }
            outputs.insert(
                name,
                OutputRecord {
                    datatype: spec::datatype_name(dt),
                    shape,
                    data,
                },
            );
        }
        self.responses[i].state = RespState::Sent;
        self.retire_outputs(i);
        let rec = ResponseRecord {
            t_ms: self.elapsed_ms(),
            source: "backend",
            flags,
            is_final: flags & FLAG_FINAL != 0,
            error,
            outputs,
            parameters: std::mem::take(&mut self.responses[i].params),
        };
        self.deliver(r, rec);
        Ok(())
    }

    /// Records a response from the backend for request `r`, checking the FINAL rules.
    pub(crate) fn deliver(&mut self, r: usize, rec: ResponseRecord) {
        let label = self.request_label(r);
        if self.requests[r].state == ReqState::HostOwned {
            self.violation(
                "execute-error-ownership",
                format!(
                    "a response was sent for {label} although TRITONBACKEND_ModelInstanceExecute \
                     returned an error (Triton already answered it)"
                ),
            );
        }
        if self.requests[r].finals > 0 {
            self.violation(
                if rec.is_final { "multiple-final" } else { "response-after-final" },
                format!(
                    "{label} got a {} after its response flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL",
                    if rec.is_final { "second FINAL" } else { "response" }
                ),
            );
        }
        if self.opts.print_stream {
            if let Some(OutputRecord {
                data: Json::Array(a),
                ..
            }) = rec.outputs.get("text_output")
            {
                let mut out = std::io::stdout().lock();
                for s in a.iter().filter_map(Json::as_str) {
                    let _ = out.write_all(s.as_bytes());
                }
                if rec.is_final {
                    let _ = out.write_all(b"\n");
                }
                let _ = out.flush();
            }
        }
        self.record(r, rec);
    }

    /// Appends a delivered response to request `r` (text, FINAL count, cancellation trigger).
    pub(crate) fn record(&mut self, r: usize, rec: ResponseRecord) {
        let req = &mut self.requests[r];
        if let Some(OutputRecord {
            data: Json::Array(a),
            ..
        }) = rec.outputs.get("text_output")
        {
            for s in a {
                match s {
                    Json::String(s) => req.text.extend_from_slice(s.as_bytes()),
                    Json::Object(o) => {
                        if let Some(h) = o.get("hex").and_then(Json::as_str) {
                            req.text.extend(spec::from_hex(h).unwrap_or_default());
                        }
                    }
                    _ => {}
                }
            }
        }
        if rec.is_final {
            req.finals += 1;
        }
        req.responses.push(rec);
        if req
            .spec
            .cancel_after_responses
            .is_some_and(|n| req.responses.len() as u64 >= n)
        {
            req.cancelled = true;
        }
        self.total_responses += 1;
        self.changed = true;
    }

    // ----- memory manager ------------------------------------------------------------------

    /// `TRITONBACKEND_MemoryManagerAllocate`: CPU memory only; the backend must free it.
    pub fn alloc(&mut self, func: &str, memory_type: u32, size: u64) -> R<*mut libc::c_void> {
        if memory_type == 2 {
            return Err(fail(
                code::UNAVAILABLE,
                "the test host has no GPU memory (TRITONSERVER_MEMORY_GPU)",
            ));
        }
        if memory_type > 2 {
            return Err(fail(
                code::INVALID_ARG,
                format!("unknown memory type {memory_type}"),
            ));
        }
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l <= 1 << 34)
            .ok_or_else(|| fail(code::UNAVAILABLE, format!("{func}: {size} bytes")))?;
        let b = GuardBuf::new(
            len,
            &format!("allocation #{} of {func}", self.allocs.len() + 1),
        );
        let p = b.ptr();
        self.allocs.push(AllocObj {
            buf: b,
            memory_type,
            freed: false,
        });
        Ok(p)
    }

    /// `TRITONBACKEND_MemoryManagerFree`.
    pub fn free(&mut self, func: &str, ptr: usize, memory_type: u32) -> R<()> {
        let Some(i) = self
            .allocs
            .iter()
            .position(|a| !a.freed && a.buf.ptr() as usize == ptr)
        else {
            return Err(self.reject(
                "memory",
                format!("{func} of {ptr:#x}, which the memory manager did not allocate or already freed"),
            ));
        };
        if self.allocs[i].memory_type != memory_type {
            let what = format!(
                "{func}: memory type {memory_type} given, allocated as {}",
                self.allocs[i].memory_type
            );
            self.violation("memory", what);
        }
        self.allocs[i].freed = true;
        let what = format!("allocation #{}", i + 1);
        self.allocs[i].buf.retire(Region::FreedAllocation, &what);
        Ok(())
    }

    // ----- buffer attributes ---------------------------------------------------------------

    /// `TRITONSERVER_BufferAttributesNew`: attributes the backend owns.
    pub fn attr_new(&mut self) -> usize {
        self.attrs.push(AttrObj {
            owner: AttrOwner::Backend,
            memory_type: 0,
            memory_type_id: 0,
            byte_size: 0,
            ipc: 0,
            deleted: false,
        });
        handle(Kind::BufferAttributes, self.attrs.len() - 1)
    }

    /// Buffer attributes still valid (their owner alive, or not deleted).
    pub(crate) fn live_attr(&mut self, func: &str, h: usize) -> R<usize> {
        let a = self.index(func, h, Kind::BufferAttributes)?;
        match self.attrs[a].owner {
            AttrOwner::Backend if self.attrs[a].deleted => Err(self.reject(
                "use-after-delete",
                format!("{func} on buffer attributes after TRITONSERVER_BufferAttributesDelete"),
            )),
            AttrOwner::Input(i) => {
                self.live_input(func, handle(Kind::Input, i))?;
                Ok(a)
            }
            AttrOwner::Output(o) => {
                self.live_output(func, handle(Kind::Output, o))?;
                Ok(a)
            }
            AttrOwner::Backend => Ok(a),
        }
    }

    /// `TRITONSERVER_BufferAttributesDelete`: only attributes the backend created.
    pub fn attr_delete(&mut self, func: &str, h: usize) -> R<()> {
        let a = self.live_attr(func, h)?;
        if self.attrs[a].owner != AttrOwner::Backend {
            return Err(self.reject(
                "attributes-ownership",
                format!(
                    "{func} on buffer attributes owned by an input or output (must not be freed)"
                ),
            ));
        }
        self.attrs[a].deleted = true;
        Ok(())
    }

    /// Reads (`set` = None) or writes one field: 0 memory type, 1 id, 2 byte size, 3 IPC handle.
    pub fn attr_field(&mut self, func: &str, h: usize, field: u8, set: Option<i64>) -> R<i64> {
        let a = self.live_attr(func, h)?;
        if let Some(v) = set {
            if self.attrs[a].owner != AttrOwner::Backend {
                return Err(self.reject(
                    "attributes-ownership",
                    format!("{func} modifies buffer attributes owned by an input or output"),
                ));
            }
            let at = &mut self.attrs[a];
            match field {
                0 => at.memory_type = v as u32,
                1 => at.memory_type_id = v,
                2 => at.byte_size = v as usize,
                _ => at.ipc = v as usize,
            }
        }
        let at = &self.attrs[a];
        Ok(match field {
            0 => i64::from(at.memory_type),
            1 => at.memory_type_id,
            2 => at.byte_size as i64,
            _ => at.ipc as i64,
        })
    }
}
