//! Requests and their inputs, statistics, response statistics: what the backend may touch
//! while it owns a request, and nothing after `TRITONBACKEND_RequestRelease`.

#![allow(clippy::wildcard_imports)]

use super::*;

impl Ledger {
    // ----- requests -------------------------------------------------------------------------

    /// The spec request `r` came from.
    pub fn request_spec(&self, r: usize) -> &RequestSpec {
        &self.requests[r].spec
    }

    /// Where request `r` is.
    pub fn request_state(&self, r: usize) -> &ReqState {
        &self.requests[r].state
    }

    /// Responses request `r` received so far (FINAL included).
    pub fn response_count(&self, r: usize) -> u64 {
        self.requests[r].responses.len() as u64
    }

    /// The host answers a request itself (core checks, unload): one FINAL error.
    pub fn host_answer(&mut self, r: usize, code: u32, msg: &str) {
        self.requests[r].state = ReqState::Rejected;
        let t = self.elapsed_ms();
        self.requests[r].submitted_ms.get_or_insert(t);
        self.record(
            r,
            ResponseRecord {
                t_ms: t,
                source: "host",
                flags: FLAG_FINAL,
                is_final: true,
                error: Some(ErrorInfo {
                    code: code_name(code),
                    message: msg.into(),
                }),
                outputs: BTreeMap::new(),
                parameters: BTreeMap::new(),
            },
        );
    }

    /// Creates the request's input objects and buffers; returns its handle.
    pub fn submit(&mut self, r: usize, inputs: Vec<EncodedInput>, instance: usize) -> usize {
        for inp in inputs {
            let label = format!(
                "input '{}' of request '{}'",
                inp.name, self.requests[r].spec.id
            );
            let byte_size = inp.buffers.iter().map(|b| b.len() as u64).sum();
            let buffers = inp
                .buffers
                .iter()
                .map(|b| GuardBuf::from_bytes(b, &label))
                .collect();
            self.inputs.push(InputObj {
                request: r,
                name: cstring(&inp.name),
                datatype: inp.datatype,
                shape: inp.shape,
                byte_size,
                buffers,
                memory_type: inp.memory_type,
            });
            let idx = self.inputs.len() - 1;
            self.requests[r].inputs.push(idx);
        }
        let params: Vec<ParamObj> = self.requests[r]
            .spec
            .parameters
            .iter()
            .map(|(k, v)| {
                let (ty, s, i, b, d) = match v {
                    Json::String(s) => (0, s.clone(), 0, false, 0.0),
                    Json::Bool(b) => (2, String::new(), 0, *b, 0.0),
                    Json::Number(n) if n.is_i64() || n.is_u64() => {
                        (1, String::new(), n.as_i64().unwrap_or(i64::MAX), false, 0.0)
                    }
                    Json::Number(n) => (3, String::new(), 0, false, n.as_f64().unwrap_or(0.0)),
                    other => (0, other.to_string(), 0, false, 0.0),
                };
                ParamObj {
                    key: cstring(k),
                    ty,
                    s: cstring(&s),
                    i: Box::new(i),
                    b: Box::new(b),
                    d: Box::new(d),
                }
            })
            .collect();
        let t = self.elapsed_ms();
        let req = &mut self.requests[r];
        req.params = params;
        req.instance = Some(instance);
        req.state = ReqState::InBackend;
        req.submitted_ms = Some(t);
        handle(Kind::Request, r)
    }

    /// Marks a request cancelled (what a client's cancellation does).
    pub fn cancel(&mut self, r: usize) {
        self.requests[r].cancelled = true;
    }

    /// `request '<id>'`, for messages.
    pub(crate) fn request_label(&self, r: usize) -> String {
        self.requests[r].label()
    }

    /// A request the backend owns now.
    pub(crate) fn live_request(&mut self, func: &str, h: usize) -> R<usize> {
        let r = self.index(func, h, Kind::Request)?;
        self.request_usable(func, r, "")?;
        Ok(r)
    }

    /// Fails unless the backend owns request `r` now; `part` prefixes the object named.
    pub(crate) fn request_usable(&mut self, func: &str, r: usize, part: &str) -> R<()> {
        let label = format!("{part}{}", self.request_label(r));
        match self.requests[r].state {
            ReqState::InBackend => Ok(()),
            ReqState::Released => Err(self.reject(
                "use-after-release",
                format!("{func} on {label} after TRITONBACKEND_RequestRelease"),
            )),
            ReqState::HostOwned => Err(self.reject(
                "execute-error-ownership",
                format!(
                    "{func} on {label} after TRITONBACKEND_ModelInstanceExecute returned an \
                     error (Triton kept the request)"
                ),
            )),
            ReqState::NotSubmitted | ReqState::Rejected => Err(self.reject(
                "wrong-handle",
                format!("{func} on {label}, which was never given to the backend"),
            )),
        }
    }

    /// `TRITONBACKEND_RequestId`.
    pub fn request_id(&mut self, func: &str, h: usize) -> R<*const libc::c_char> {
        let r = self.live_request(func, h)?;
        Ok(self.requests[r].id.as_ptr())
    }

    /// `TRITONBACKEND_RequestFlags`.
    pub fn request_flags(&mut self, func: &str, h: usize) -> R<u32> {
        let r = self.live_request(func, h)?;
        Ok(self.requests[r].spec.flags)
    }

    /// `TRITONBACKEND_RequestCorrelationId`.
    pub fn request_correlation_id(&mut self, func: &str, h: usize) -> R<u64> {
        let r = self.live_request(func, h)?;
        Ok(self.requests[r].spec.correlation_id)
    }

    /// `TRITONBACKEND_RequestCorrelationIdString`: an error, the id is not a string (as in Triton).
    pub fn request_correlation_string(&mut self, func: &str, h: usize) -> R<*const libc::c_char> {
        let r = self.live_request(func, h)?;
        Err(fail(
            code::INVALID_ARG,
            format!(
                "[request id: {}] correlation ID in request is not a string",
                self.requests[r].spec.id
            ),
        ))
    }

    /// Checks a request handle for calls that only read constants (timeout, trace).
    pub fn request_touch(&mut self, func: &str, h: usize) -> R<()> {
        self.live_request(func, h).map(|_| ())
    }

    /// `TRITONBACKEND_RequestIsCancelled`.
    pub fn request_is_cancelled(&mut self, func: &str, h: usize) -> R<bool> {
        let r = self.live_request(func, h)?;
        Ok(self.requests[r].cancelled)
    }

    /// `TRITONBACKEND_RequestParameterCount`.
    pub fn request_parameter_count(&mut self, func: &str, h: usize) -> R<u32> {
        let r = self.live_request(func, h)?;
        Ok(self.requests[r].params.len() as u32)
    }

    /// Key, type and value pointer of parameter `index`.
    pub fn request_parameter(
        &mut self,
        func: &str,
        h: usize,
        index: u32,
    ) -> R<(*const libc::c_char, u32, *const libc::c_void)> {
        let r = self.live_request(func, h)?;
        let n = self.requests[r].params.len();
        let Some(p) = self.requests[r].params.get(index as usize) else {
            return Err(fail(
                code::INVALID_ARG,
                format!("out of bounds index {index}: request has {n} parameters"),
            ));
        };
        let v: *const libc::c_void = match p.ty {
            0 => p.s.as_ptr().cast(),
            1 => (&*p.i as *const i64).cast(),
            2 => (&*p.b as *const bool).cast(),
            _ => (&*p.d as *const f64).cast(),
        };
        Ok((p.key.as_ptr(), p.ty, v))
    }

    /// `TRITONBACKEND_RequestInputCount`.
    pub fn request_input_count(&mut self, func: &str, h: usize) -> R<u32> {
        let r = self.live_request(func, h)?;
        Ok(self.requests[r].inputs.len() as u32)
    }

    /// `TRITONBACKEND_RequestInputByIndex`: the input's index in the ledger.
    pub fn request_input_by_index(&mut self, func: &str, h: usize, index: u32) -> R<usize> {
        let r = self.live_request(func, h)?;
        let n = self.requests[r].inputs.len();
        match self.requests[r].inputs.get(index as usize) {
            Some(&i) => Ok(i),
            None => Err(fail(
                code::INVALID_ARG,
                format!(
                    "[request id: {}] out of bounds index {index}: request has {n} inputs",
                    self.requests[r].spec.id
                ),
            )),
        }
    }

    /// `TRITONBACKEND_RequestInputName`.
    pub fn request_input_name(
        &mut self,
        func: &str,
        h: usize,
        index: u32,
    ) -> R<*const libc::c_char> {
        let i = self.request_input_by_index(func, h, index)?;
        Ok(self.inputs[i].name.as_ptr())
    }

    /// `TRITONBACKEND_RequestInput`: the input's handle.
    pub fn request_input(&mut self, func: &str, h: usize, name: &str) -> R<usize> {
        let r = self.live_request(func, h)?;
        let found = self.requests[r]
            .inputs
            .iter()
            .copied()
            .find(|&i| self.inputs[i].name.to_bytes() == name.as_bytes());
        match found {
            Some(i) => Ok(handle(Kind::Input, i)),
            None => Err(fail(
                code::INVALID_ARG,
                format!(
                    "[request id: {}] unknown request input name {name}",
                    self.requests[r].spec.id
                ),
            )),
        }
    }

    /// `TRITONBACKEND_RequestOutputCount`: the outputs requested (all declared ones if none).
    pub fn request_output_count(&mut self, func: &str, h: usize) -> R<u32> {
        let r = self.live_request(func, h)?;
        Ok(self.requests[r].requested.len() as u32)
    }

    /// `TRITONBACKEND_RequestOutputName`.
    pub fn request_output_name(
        &mut self,
        func: &str,
        h: usize,
        index: u32,
    ) -> R<*const libc::c_char> {
        let r = self.live_request(func, h)?;
        let n = self.requests[r].requested.len();
        match self.requests[r].requested.get(index as usize) {
            Some(s) => Ok(s.as_ptr()),
            None => Err(fail(
                code::INVALID_ARG,
                format!("out of bounds index {index}: request has {n} requested outputs"),
            )),
        }
    }

    /// `TRITONBACKEND_RequestRelease`.
    pub fn request_release(&mut self, func: &str, h: usize, flags: u32) -> R<()> {
        let r = self.live_request(func, h)?;
        let label = self.request_label(r);
        if flags & RELEASE_RESCHEDULE != 0 {
            return Err(self.reject(
                "release-flags",
                format!(
                    "{label} released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, which needs \
                     sequence batching with iterative_sequence"
                ),
            ));
        }
        if flags != RELEASE_ALL {
            return Err(self.reject(
                "release-flags",
                format!("{label} released with flags {flags}; TRITONSERVER_REQUEST_RELEASE_ALL (1) expected"),
            ));
        }
        if self.requests[r].stats.is_none() && self.opts.require_statistics {
            self.violation(
                "statistics",
                format!("{label} released without TRITONBACKEND_ModelInstanceReportStatistics"),
            );
        }
        self.requests[r].state = ReqState::Released;
        let id = self.requests[r].spec.id.clone();
        for &i in &self.requests[r].inputs.clone() {
            let what = format!(
                "input '{}' of request '{id}'",
                self.inputs[i].name.to_string_lossy()
            );
            for b in &mut self.inputs[i].buffers {
                b.retire(Region::ReleasedInput, &what);
            }
        }
        self.changed = true;
        Ok(())
    }

    // ----- inputs ---------------------------------------------------------------------------

    /// An input whose request the backend owns now.
    pub(crate) fn live_input(&mut self, func: &str, h: usize) -> R<usize> {
        let i = self.index(func, h, Kind::Input)?;
        let r = self.inputs[i].request;
        let part = format!("input '{}' of ", self.inputs[i].name.to_string_lossy());
        self.request_usable(func, r, &part)?;
        Ok(i)
    }

    /// Name, datatype, shape pointer, dims, byte size, buffer count.
    #[allow(clippy::type_complexity)]
    pub fn input_properties(
        &mut self,
        func: &str,
        h: usize,
    ) -> R<(*const libc::c_char, u32, *const i64, u32, u64, u32)> {
        let i = self.live_input(func, h)?;
        let inp = &self.inputs[i];
        Ok((
            inp.name.as_ptr(),
            inp.datatype,
            inp.shape.as_ptr(),
            inp.shape.len() as u32,
            inp.byte_size,
            inp.buffers.len() as u32,
        ))
    }

    /// Pointer, size and reported memory type of buffer `index`.
    pub fn input_buffer(
        &mut self,
        func: &str,
        h: usize,
        index: u32,
    ) -> R<(*const libc::c_void, u64, u32)> {
        let i = self.live_input(func, h)?;
        let n = self.inputs[i].buffers.len();
        let memory_type = self.inputs[i].memory_type;
        match self.inputs[i].buffers.get(index as usize) {
            Some(b) => Ok((b.ptr().cast_const(), b.len() as u64, memory_type)),
            None => Err(fail(
                code::INVALID_ARG,
                format!(
                    "input '{}' has {n} buffers, index {index} requested",
                    self.inputs[i].name.to_string_lossy()
                ),
            )),
        }
    }

    /// `TRITONBACKEND_InputBufferAttributes`: attributes owned by the input.
    pub fn input_buffer_attributes(
        &mut self,
        func: &str,
        h: usize,
        index: u32,
    ) -> R<(*const libc::c_void, usize)> {
        let (p, size, memory_type) = self.input_buffer(func, h, index)?;
        let i = self.index(func, h, Kind::Input)?;
        self.attrs.push(AttrObj {
            owner: AttrOwner::Input(i),
            memory_type,
            memory_type_id: 0,
            byte_size: size as usize,
            ipc: 0,
            deleted: false,
        });
        Ok((p, handle(Kind::BufferAttributes, self.attrs.len() - 1)))
    }

    // ----- statistics ------------------------------------------------------------------------

    /// The statistics timestamp rules: ordered, `CLOCK_MONOTONIC` nanoseconds within the run.
    pub(crate) fn check_times(&mut self, what: &str, t: [u64; 4]) {
        let now = now_ns();
        if !(t[0] <= t[1] && t[1] <= t[2] && t[2] <= t[3]) {
            self.violation(
                "statistics",
                format!("{what}: timestamps not in order exec_start <= compute_start <= compute_end <= exec_end: {t:?}"),
            );
        }
        if t.iter().any(|&x| x < self.start_ns || x > now) {
            self.violation(
                "statistics",
                format!(
                    "{what}: timestamps {t:?} outside the run ({} ..= {now} ns of CLOCK_MONOTONIC, \
                     the steady clock Triton uses)",
                    self.start_ns
                ),
            );
        }
    }

    /// `TRITONBACKEND_ModelInstanceReportStatistics`: once per request, before its release, on the instance that executes it.
    pub fn report_statistics(
        &mut self,
        func: &str,
        inst: usize,
        req: usize,
        success: bool,
        t: [u64; 4],
    ) -> R<()> {
        let ii = self.instance_index(func, inst)?;
        let r = self.live_request(func, req)?;
        let label = self.request_label(r);
        if self.requests[r].instance != Some(ii) {
            let what = format!(
                "statistics for {label} reported on instance {}, which did not execute it",
                self.instances[ii].spec.name
            );
            self.violation("statistics", what);
        }
        if self.requests[r].stats.is_some() {
            self.violation(
                "statistics",
                format!("statistics for {label} reported twice"),
            );
        }
        if success {
            self.check_times(&format!("statistics of {label}"), t);
        }
        self.requests[r].stats = Some(RequestStats {
            success,
            exec_start_ns: t[0],
            compute_start_ns: t[1],
            compute_end_ns: t[2],
            exec_end_ns: t[3],
        });
        Ok(())
    }

    /// `TRITONBACKEND_ModelInstanceReportBatchStatistics` (recorded).
    pub fn report_batch_statistics(
        &mut self,
        func: &str,
        inst: usize,
        batch: u64,
        t: [u64; 4],
    ) -> R<()> {
        let ii = self.instance_index(func, inst)?;
        if batch == 0 {
            self.violation("statistics", format!("{func} with batch size 0"));
        }
        self.check_times("batch statistics", t);
        let name = self.instances[ii].spec.name.clone();
        self.batch_stats.push(json!({
            "instance": name, "batch_size": batch, "exec_start_ns": t[0],
            "compute_start_ns": t[1], "compute_end_ns": t[2], "exec_end_ns": t[3]
        }));
        Ok(())
    }

    // ----- response statistics ---------------------------------------------------------------

    /// `TRITONBACKEND_ModelInstanceResponseStatisticsNew`: an object the backend must delete.
    pub fn resp_stats_new(&mut self) -> usize {
        self.resp_stats.push(RespStatsObj::default());
        handle(Kind::ResponseStats, self.resp_stats.len() - 1)
    }

    /// A response-statistics object not yet deleted.
    pub(crate) fn live_resp_stats(&mut self, func: &str, h: usize) -> R<usize> {
        let i = self.index(func, h, Kind::ResponseStats)?;
        if self.resp_stats[i].deleted {
            return Err(self.reject(
                "use-after-delete",
                format!("{func} on response statistics after ResponseStatisticsDelete"),
            ));
        }
        Ok(i)
    }

    /// `TRITONBACKEND_ModelInstanceResponseStatisticsDelete`.
    pub fn resp_stats_delete(&mut self, func: &str, h: usize) -> R<()> {
        let i = self.live_resp_stats(func, h)?;
        self.resp_stats[i].deleted = true;
        Ok(())
    }

    /// `TRITONBACKEND_ModelInstanceResponseStatisticsSetModelInstance`.
    pub fn resp_stats_set_instance(&mut self, func: &str, h: usize, inst: usize) -> R<()> {
        let i = self.live_resp_stats(func, h)?;
        let ii = self.instance_index(func, inst)?;
        self.resp_stats[i].instance = Some(ii);
        Ok(())
    }

    /// `TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseFactory`.
    pub fn resp_stats_set_factory(&mut self, func: &str, h: usize, f: usize) -> R<()> {
        let i = self.live_resp_stats(func, h)?;
        let fi = self.live_factory(func, f)?;
        self.resp_stats[i].factory = Some(fi);
        Ok(())
    }

    /// `...SetResponseStart` (0), `...SetComputeOutputStart` (1), `...SetResponseEnd` (2).
    pub fn resp_stats_set_time(&mut self, func: &str, h: usize, which: usize, t: u64) -> R<()> {
        let i = self.live_resp_stats(func, h)?;
        self.resp_stats[i].times[which] = t;
        Ok(())
    }

    /// `TRITONBACKEND_ModelInstanceResponseStatisticsSetError` (the error stays the caller's).
    pub fn resp_stats_set_error(&mut self, func: &str, h: usize, err: usize) -> R<()> {
        let i = self.live_resp_stats(func, h)?;
        let e = if err == 0 {
            None
        } else {
            let ei = self.live_error(func, err)?;
            Some(ErrorInfo {
                code: code_name(self.errors[ei].code),
                message: self.errors[ei].msg.to_string_lossy().into_owned(),
            })
        };
        self.resp_stats[i].error = e;
        Ok(())
    }

    /// `TRITONBACKEND_ModelInstanceReportResponseStatistics` (recorded).
    pub fn resp_stats_report(&mut self, func: &str, h: usize) -> R<()> {
        let i = self.live_resp_stats(func, h)?;
        let (Some(inst), Some(f)) = (self.resp_stats[i].instance, self.resp_stats[i].factory)
        else {
            return Err(fail(
                code::INVALID_ARG,
                "response statistics need a model instance and a response factory",
            ));
        };
        let s = &self.resp_stats[i];
        let rec = json!({
            "instance": self.instances[inst].spec.name,
            "request": self.requests[self.factories[f].request].spec.id,
            "response_start_ns": s.times[0], "compute_output_start_ns": s.times[1],
            "response_end_ns": s.times[2], "error": s.error,
        });
        self.reported_resp_stats.push(rec);
        Ok(())
    }

    // ----- Execute ---------------------------------------------------------------------------

    /// Records an Execute call of `instance` with `reqs` (before it runs).
    pub fn begin_execute(&mut self, instance: usize, reqs: &[usize]) {
        let rec = ExecuteRecord {
            t_ms: self.elapsed_ms(),
            instance: self.instances[instance].spec.name.clone(),
            requests: reqs
                .iter()
                .map(|&r| self.requests[r].spec.id.clone())
                .collect(),
            error: None,
        };
        self.executes.push(rec);
    }

    /// After Execute returned `err` (0 = success) for `reqs`.
    pub fn end_execute(&mut self, reqs: &[usize], err: usize) {
        const ENTRY: &str = "TRITONBACKEND_ModelInstanceExecute";
        if err == 0 {
            for &r in reqs {
                if self.requests[r].spec.cancel_after_responses == Some(0) {
                    self.requests[r].cancelled = true;
                }
            }
            return;
        }
        let info = self.take_entry_error(ENTRY, err).expect("non-null error");
        self.entry_errors.pop();
        if let Some(last) = self.executes.last_mut() {
            last.error = Some(info.clone());
        }
        for &r in reqs {
            let label = self.request_label(r);
            match self.requests[r].state {
                ReqState::Released => self.violation(
                    "execute-error-ownership",
                    format!(
                        "{label} was released by the backend although {ENTRY} returned an error"
                    ),
                ),
                _ if !self.requests[r].responses.is_empty() => self.violation(
                    "execute-error-ownership",
                    format!(
                        "{label} got responses from the backend although {ENTRY} returned an error"
                    ),
                ),
                _ => {}
            }
            self.requests[r].state = ReqState::HostOwned;
            let t = self.elapsed_ms();
            self.record(
                r,
                ResponseRecord {
                    t_ms: t,
                    source: "host",
                    flags: FLAG_FINAL,
                    is_final: true,
                    error: Some(info.clone()),
                    outputs: BTreeMap::new(),
                    parameters: BTreeMap::new(),
                },
            );
        }
    }
}
