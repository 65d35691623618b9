//! A request's input tensors, copied out of Triton, checked and turned into what the engine
//! needs. No FFI here: `request.rs` reads the tensors, this module judges them, so every rule of
//! the request contract (docs/triton.md, "Requests and responses") is unit-tested on plain data.
//!
//! Every error is an [`TritonError::InvalidInput`] whose message starts with the input's name:
//! `input 'top_p': must be in (0, 1], got 1.5`.

use super::error::TritonError;

/// The data types this backend reads or writes, plus any other Triton type by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    /// `TYPE_BOOL`, one byte per element.
    Bool,
    /// `TYPE_INT32`.
    Int32,
    /// `TYPE_INT64`.
    Int64,
    /// `TYPE_UINT64`.
    Uint64,
    /// `TYPE_FP32`.
    Fp32,
    /// `TYPE_STRING`: each element a little-endian `u32` length and that many bytes.
    Bytes,
    /// Any other type; the name is Triton's (`FP16`, `UINT8`, ...).
    Other(&'static str),
}

impl DataType {
    /// Triton's name of the type, as clients see it.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Uint64 => "UINT64",
            DataType::Fp32 => "FP32",
            DataType::Bytes => "BYTES",
            DataType::Other(n) => n,
        }
    }
}

/// One input tensor as the request carried it, its buffers concatenated.
#[derive(Clone, Debug, PartialEq)]
pub struct RawInput {
    /// The input's name.
    pub name: String,
    /// Its type.
    pub datatype: DataType,
    /// Its shape, batch dimension included when the model has one.
    pub shape: Vec<i64>,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// The prompt, as text or as token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// `text_input`.
    Text(String),
    /// `input_ids`.
    Ids(Vec<i32>),
}

/// Everything a request asks for, checked for type, shape and range (the checks that need the
/// model, such as the vocabulary and the context, come in [`GenerateInputs::check_against`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateInputs {
    /// The prompt.
    pub prompt: Prompt,
    /// `max_tokens`, if given (≥ 1).
    pub max_tokens: Option<usize>,
    /// `stream`.
    pub stream: bool,
    /// `temperature` (finite, ≥ 0).
    pub temperature: f32,
    /// `top_p` (in (0, 1]).
    pub top_p: f32,
    /// `top_k` (0 = off).
    pub top_k: usize,
    /// `random_seed`, or `seed` (the name Triton's OpenAI-compatible frontend sends); a random
    /// one per request when neither is given.
    pub seed: u64,
    /// `frequency_penalty` (in [-2, 2]; 0 = off).
    pub frequency_penalty: f32,
    /// `presence_penalty` (in [-2, 2]; 0 = off).
    pub presence_penalty: f32,
    /// `stop_words` (none empty).
    pub stop_words: Vec<String>,
    /// `exclude_input_in_output`, if given (else the model's `exclude_input_in_output`
    /// parameter decides).
    pub exclude_input: Option<bool>,
    /// `min_length`.
    pub min_length: usize,
    /// `stop_token_ids` (each ≥ 0; checked against the vocabulary in
    /// [`GenerateInputs::check_against`]).
    pub stop_token_ids: Vec<u32>,
}

/// The inputs a request may carry; anything else is an error.
pub const KNOWN_INPUTS: [&str; 15] = [
    "text_input",
    "input_ids",
    "max_tokens",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "random_seed",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "stop_words",
    "exclude_input_in_output",
    "min_length",
    "stop_token_ids",
];

fn invalid(name: &str, what: impl std::fmt::Display) -> TritonError {
    TritonError::InvalidInput(format!("input '{name}': {what}"))
}

/// The request-level dimensions of `input` once the batch dimension (when the model has one)
/// is checked and removed.
fn element_dims(input: &RawInput, batched: bool) -> Result<&[i64], TritonError> {
    if let Some(&d) = input.shape.iter().find(|&&d| d < 0) {
        return Err(invalid(&input.name, format!("negative dimension {d}")));
    }
    if !batched {
        return Ok(&input.shape);
    }
    match input.shape.split_first() {
        Some((1, rest)) => Ok(rest),
        Some((b, _)) => Err(invalid(
            &input.name,
            format!(
                "batch dimension {b}: send one prompt per request (shape {:?})",
                input.shape
            ),
        )),
        None => Err(invalid(
            &input.name,
            "a scalar shape [], but the model has a batch dimension: expected [1, ...]",
        )),
    }
}

/// The element count of a tensor whose request-level shape must be a vector (`[n]`) or a
/// scalar (`[]`, one element).
fn vector_len(input: &RawInput, batched: bool) -> Result<usize, TritonError> {
    let dims = element_dims(input, batched)?;
    match dims {
        [] => Ok(1),
        [n] => usize::try_from(*n).map_err(|_| invalid(&input.name, "dimension too large")),
        _ => Err(invalid(
            &input.name,
            format!(
                "shape {:?}: expected {}[n]",
                input.shape,
                if batched { "[1, n] or " } else { "" }
            ),
        )),
    }
}

fn expect_type(input: &RawInput, want: DataType) -> Result<(), TritonError> {
    if input.datatype == want {
        Ok(())
    } else {
        Err(invalid(
            &input.name,
            format!(
                "data type {}, expected {}",
                input.datatype.name(),
                want.name()
            ),
        ))
    }
}

/// The bytes of the single element of a one-element tensor of `want` type, `size` bytes wide.
fn scalar_bytes(
    input: &RawInput,
    batched: bool,
    want: DataType,
    size: usize,
) -> Result<&[u8], TritonError> {
    expect_type(input, want)?;
    let n = vector_len(input, batched)?;
    if n != 1 {
        return Err(invalid(
            &input.name,
            format!("shape {:?}: expected exactly one element", input.shape),
        ));
    }
    if input.data.len() != size {
        return Err(invalid(
            &input.name,
            format!(
                "{} bytes of data for one {} element ({size} bytes)",
                input.data.len(),
                want.name()
            ),
        ));
    }
    Ok(&input.data)
}

fn scalar_i32(input: &RawInput, batched: bool) -> Result<i32, TritonError> {
    let b = scalar_bytes(input, batched, DataType::Int32, 4)?;
    Ok(i32::from_le_bytes(b.try_into().expect("4 bytes checked")))
}

fn scalar_u64(input: &RawInput, batched: bool) -> Result<u64, TritonError> {
    let b = scalar_bytes(input, batched, DataType::Uint64, 8)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8 bytes checked")))
}

fn scalar_f32(input: &RawInput, batched: bool) -> Result<f32, TritonError> {
    let b = scalar_bytes(input, batched, DataType::Fp32, 4)?;
    Ok(f32::from_le_bytes(b.try_into().expect("4 bytes checked")))
}

fn scalar_bool(input: &RawInput, batched: bool) -> Result<bool, TritonError> {
    match scalar_bytes(input, batched, DataType::Bool, 1)?[0] {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(invalid(
            &input.name,
            format!("boolean byte {b}, expected 0 or 1"),
        )),
    }
}

/// The elements of a BYTES tensor: exactly as many as the shape says, each a UTF-8 string.
fn strings(input: &RawInput, batched: bool) -> Result<Vec<String>, TritonError> {
    expect_type(input, DataType::Bytes)?;
    let n = vector_len(input, batched)?;
    let mut out = Vec::with_capacity(n.min(1024));
    let mut rest = input.data.as_slice();
    for i in 0..n {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(invalid(
                &input.name,
                format!("element {i} of {n}: the data ends before its 4-byte length"),
            ));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(invalid(
                &input.name,
                format!(
                    "element {i} of {n}: length {len} but only {} bytes left",
                    tail.len()
                ),
            ));
        }
        let (bytes, tail) = tail.split_at(len);
        let s = std::str::from_utf8(bytes)
            .map_err(|e| invalid(&input.name, format!("element {i} is not valid UTF-8 ({e})")))?;
        out.push(s.to_string());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(invalid(
            &input.name,
            format!(
                "{} bytes of data after the {n} element(s) its shape {:?} holds",
                rest.len(),
                input.shape
            ),
        ));
    }
    Ok(out)
}

fn int32s(input: &RawInput, batched: bool) -> Result<Vec<i32>, TritonError> {
    expect_type(input, DataType::Int32)?;
    let n = vector_len(input, batched)?;
    if input.data.len() != n * 4 {
        return Err(invalid(
            &input.name,
            format!(
                "{} bytes of data for {n} INT32 elements ({} bytes)",
                input.data.len(),
                n * 4
            ),
        ));
    }
    Ok(input
        .data
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().expect("chunks of 4")))
        .collect())
}

fn non_negative(name: &str, v: i32) -> Result<usize, TritonError> {
    usize::try_from(v).map_err(|_| invalid(name, format!("must be 0 or more, got {v}")))
}

impl GenerateInputs {
    /// Reads and checks the inputs of one request. `batched` is whether the model has a batch
    /// dimension (`max_batch_size` ≥ 1).
    pub fn parse(inputs: &[RawInput], batched: bool) -> Result<Self, TritonError> {
        for (i, input) in inputs.iter().enumerate() {
            if !KNOWN_INPUTS.contains(&input.name.as_str()) {
                return Err(invalid(
                    &input.name,
                    format!("unknown input; known: {}", KNOWN_INPUTS.join(", ")),
                ));
            }
            if inputs[..i].iter().any(|o| o.name == input.name) {
                return Err(invalid(&input.name, "given twice"));
            }
        }
        let get = |name: &str| inputs.iter().find(|i| i.name == name);

        let prompt = match (get("text_input"), get("input_ids")) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "text_input",
                    "give either text_input or input_ids, not both",
                ))
            }
            (None, None) => {
                return Err(TritonError::InvalidInput(
                    "no prompt: the request needs the input 'text_input' (BYTES) or \
                     'input_ids' (INT32)"
                        .into(),
                ))
            }
            (Some(t), None) => {
                let mut v = strings(t, batched)?;
                if v.len() != 1 {
                    return Err(invalid(
                        "text_input",
                        format!("shape {:?}: expected exactly one string", t.shape),
                    ));
                }
                let text = v.remove(0);
                if text.is_empty() {
                    return Err(invalid("text_input", "the prompt is empty"));
                }
                Prompt::Text(text)
            }
            (None, Some(ids)) => {
                let ids = int32s(ids, batched)?;
                if ids.is_empty() {
                    return Err(invalid("input_ids", "the prompt is empty"));
                }
                Prompt::Ids(ids)
            }
        };

        let max_tokens = match get("max_tokens") {
            None => None,
            Some(i) => match scalar_i32(i, batched)? {
                n if n >= 1 => Some(n as usize),
                n => {
                    return Err(invalid(
                        "max_tokens",
                        format!("must be at least 1, got {n}"),
                    ))
                }
            },
        };
        let stream = get("stream")
            .map(|i| scalar_bool(i, batched))
            .transpose()?
            .unwrap_or(false);
        let temperature = match get("temperature") {
            None => 0.0,
            Some(i) => match scalar_f32(i, batched)? {
                t if t.is_finite() && t >= 0.0 => t,
                t => {
                    return Err(invalid(
                        "temperature",
                        format!("must be a finite number >= 0 (0 = greedy), got {t}"),
                    ))
                }
            },
        };
        let top_p = match get("top_p") {
            None => 1.0,
            Some(i) => match scalar_f32(i, batched)? {
                p if p > 0.0 && p <= 1.0 => p,
                p => return Err(invalid("top_p", format!("must be in (0, 1], got {p}"))),
            },
        };
        let top_k = get("top_k")
            .map(|i| scalar_i32(i, batched).and_then(|v| non_negative("top_k", v)))
            .transpose()?
            .unwrap_or(0);
        let seed = match (get("random_seed"), get("seed")) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "seed",
                    "give the seed as 'random_seed' or as 'seed', not both",
                ))
            }
            (Some(i), None) | (None, Some(i)) => scalar_u64(i, batched)?,
            // No seed: a fresh one per request, so two unseeded sampled requests for the same
            // prompt differ (as OpenAI's and vLLM's do); give a seed to reproduce a generation.
            (None, None) => rand::random::<u64>(),
        };
        let penalty = |name: &str| -> Result<f32, TritonError> {
            match get(name) {
                None => Ok(0.0),
                Some(i) => match scalar_f32(i, batched)? {
                    v if (-2.0..=2.0).contains(&v) => Ok(v),
                    v => Err(invalid(name, format!("must be in [-2, 2], got {v}"))),
                },
            }
        };
        let frequency_penalty = penalty("frequency_penalty")?;
        let presence_penalty = penalty("presence_penalty")?;
        let stop_words = match get("stop_words") {
            None => Vec::new(),
            Some(i) => {
                let words = strings(i, batched)?;
                if let Some(k) = words.iter().position(String::is_empty) {
                    return Err(invalid("stop_words", format!("element {k} is empty")));
                }
                words
            }
        };
        let exclude_input = get("exclude_input_in_output")
            .map(|i| scalar_bool(i, batched))
            .transpose()?;
        let min_length = get("min_length")
            .map(|i| scalar_i32(i, batched).and_then(|v| non_negative("min_length", v)))
            .transpose()?
            .unwrap_or(0);
        let stop_token_ids = match get("stop_token_ids") {
            None => Vec::new(),
            Some(i) => int32s(i, batched)?
                .into_iter()
                .enumerate()
                .map(|(k, t)| {
                    u32::try_from(t).map_err(|_| {
                        invalid(
                            "stop_token_ids",
                            format!("element {k} is {t}, not a token id"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        Ok(Self {
            prompt,
            max_tokens,
            stream,
            temperature,
            top_p,
            top_k,
            seed,
            frequency_penalty,
            presence_penalty,
            stop_words,
            exclude_input,
            min_length,
            stop_token_ids,
        })
    }

    /// The checks that need the model: token ids inside the vocabulary, a prompt that leaves
    /// room for one token in the context, `max_tokens` no larger than the context (a larger
    /// value could never be honoured), `min_length` no larger than the token limit, stop token
    /// ids inside the vocabulary. `prompt` is
    /// the tokenized prompt; `max_tokens` the limit in force (given or default).
    pub fn check_against(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        vocab: usize,
        context: usize,
    ) -> Result<(), TritonError> {
        let source = match self.prompt {
            Prompt::Text(_) => "text_input",
            Prompt::Ids(_) => "input_ids",
        };
        if let Prompt::Ids(ids) = &self.prompt {
            if let Some((k, &t)) = ids
                .iter()
                .enumerate()
                .find(|&(_, &t)| t < 0 || t as usize >= vocab)
            {
                return Err(invalid(
                    "input_ids",
                    format!("element {k} is {t}, outside the vocabulary [0, {vocab})"),
                ));
            }
        }
        if prompt.is_empty() {
            return Err(invalid(source, "the prompt is empty after tokenization"));
        }
        if prompt.len() >= context {
            return Err(invalid(
                source,
                format!(
                    "the prompt has {} tokens; the context holds {context}, leaving no room to \
                     generate",
                    prompt.len()
                ),
            ));
        }
        if max_tokens > context {
            return Err(invalid(
                "max_tokens",
                format!("{max_tokens} is more than the context of {context} tokens"),
            ));
        }
        if let Some((k, &t)) = self
            .stop_token_ids
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab)
        {
            return Err(invalid(
                "stop_token_ids",
                format!("element {k} is {t}, outside the vocabulary [0, {vocab})"),
            ));
        }
        if self.min_length > max_tokens {
            return Err(invalid(
                "min_length",
                format!("{} is more than max_tokens ({max_tokens})", self.min_length),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(items: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for s in items {
            v.extend_from_slice(&(s.len() as u32).to_le_bytes());
            v.extend_from_slice(s);
        }
        v
    }

    fn text(s: &str) -> RawInput {
        RawInput {
            name: "text_input".into(),
            datatype: DataType::Bytes,
            shape: vec![1, 1],
            data: bytes_of(&[s.as_bytes()]),
        }
    }

    fn i32_input(name: &str, v: i32) -> RawInput {
        RawInput {
            name: name.into(),
            datatype: DataType::Int32,
            shape: vec![1, 1],
            data: v.to_le_bytes().to_vec(),
        }
    }

    fn f32_input(name: &str, v: f32) -> RawInput {
        RawInput {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![1, 1],
            data: v.to_le_bytes().to_vec(),
        }
    }

    fn err(inputs: &[RawInput]) -> String {
        match GenerateInputs::parse(inputs, true) {
            Ok(g) => panic!("accepted: {g:?}"),
            Err(e) => {
                assert_eq!(e.kind(), super::super::ErrorKind::InvalidArg);
                e.to_string()
            }
        }
    }

    #[test]
    fn a_full_request_parses() {
        let inputs = vec![
            text("Hello"),
            i32_input("max_tokens", 7),
            RawInput {
                name: "stream".into(),
                datatype: DataType::Bool,
                shape: vec![1, 1],
                data: vec![1],
            },
            f32_input("temperature", 0.7),
            f32_input("top_p", 0.9),
            i32_input("top_k", 40),
            RawInput {
                name: "random_seed".into(),
                datatype: DataType::Uint64,
                shape: vec![1, 1],
                data: 99u64.to_le_bytes().to_vec(),
            },
            RawInput {
                name: "stop_words".into(),
                datatype: DataType::Bytes,
                shape: vec![1, 2],
                data: bytes_of(&[b"\n\n", b"END"]),
            },
            RawInput {
                name: "exclude_input_in_output".into(),
                datatype: DataType::Bool,
                shape: vec![1, 1],
                data: vec![1],
            },
            i32_input("min_length", 3),
            f32_input("frequency_penalty", 0.5),
            f32_input("presence_penalty", -0.25),
            RawInput {
                name: "stop_token_ids".into(),
                datatype: DataType::Int32,
                shape: vec![1, 2],
                data: [2i32, 49151].iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ];
        let g = GenerateInputs::parse(&inputs, true).unwrap();
        assert_eq!(
            g,
            GenerateInputs {
                prompt: Prompt::Text("Hello".into()),
                max_tokens: Some(7),
                stream: true,
                temperature: 0.7,
                top_p: 0.9,
                top_k: 40,
                seed: 99,
                frequency_penalty: 0.5,
                presence_penalty: -0.25,
                stop_words: vec!["\n\n".into(), "END".into()],
                exclude_input: Some(true),
                min_length: 3,
                stop_token_ids: vec![2, 49151],
            }
        );
        // Without the batch dimension (max_batch_size 0) and with defaults.
        let mut t = text("Hi");
        t.shape = vec![1];
        let g = GenerateInputs::parse(&[t], false).unwrap();
        assert_eq!(
            (g.max_tokens, g.stream, g.temperature, g.top_p, g.top_k),
            (None, false, 0.0, 1.0, 0)
        );
        assert_eq!(
            (g.frequency_penalty, g.presence_penalty, g.exclude_input),
            (0.0, 0.0, None)
        );
    }

    /// Triton's OpenAI-compatible frontend names the seed `seed` (TensorRT-LLM's name);
    /// `random_seed` is the same input, and both at once is an error naming them.
    #[test]
    fn seed_under_either_name_and_penalties_in_range() {
        let seed = |name: &str, v: u64| RawInput {
            name: name.into(),
            datatype: DataType::Uint64,
            shape: vec![1, 1],
            data: v.to_le_bytes().to_vec(),
        };
        let g = GenerateInputs::parse(&[text("a"), seed("seed", 7)], true).unwrap();
        assert_eq!(g.seed, 7);
        // No seed: each request draws its own, so unseeded sampled requests differ.
        let (a, b) = (
            GenerateInputs::parse(&[text("a")], true).unwrap().seed,
            GenerateInputs::parse(&[text("a")], true).unwrap().seed,
        );
        assert_ne!(a, b);
        let g = GenerateInputs::parse(&[text("a"), seed("random_seed", 8)], true).unwrap();
        assert_eq!(g.seed, 8);
        let e = GenerateInputs::parse(&[text("a"), seed("seed", 7), seed("random_seed", 8)], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'random_seed' or as 'seed'"), "{e}");
        for (name, v) in [
            ("frequency_penalty", 2.5),
            ("presence_penalty", -3.0),
            ("presence_penalty", f32::NAN),
        ] {
            let e = GenerateInputs::parse(&[text("a"), f32_input(name, v)], true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("input '{name}': must be in [-2, 2]")),
                "{e}"
            );
        }
    }

    #[test]
    fn input_ids_prompt() {
        let ids = RawInput {
            name: "input_ids".into(),
            datatype: DataType::Int32,
            shape: vec![1, 3],
            data: [5i32, 6, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let g = GenerateInputs::parse(&[ids], true).unwrap();
        assert_eq!(g.prompt, Prompt::Ids(vec![5, 6, 7]));
        assert!(g.check_against(&[5, 6, 7], 10, 8, 100).is_ok());
        let e = g.check_against(&[5, 6, 7], 10, 7, 100).unwrap_err();
        assert!(
            e.to_string().contains("input 'input_ids': element 2 is 7"),
            "{e}"
        );
    }

    #[test]
    fn bad_requests_name_the_input() {
        let cases: Vec<(Vec<RawInput>, &str)> = vec![
            (vec![i32_input("max_tokens", 4)], "no prompt"),
            (
                vec![text("a"), f32_input("max_tokens", 4.0)],
                "input 'max_tokens': data type FP32, expected INT32",
            ),
            (
                vec![RawInput {
                    shape: vec![1, 2],
                    data: bytes_of(&[b"a", b"b"]),
                    ..text("")
                }],
                "input 'text_input': shape [1, 2]: expected exactly one string",
            ),
            (
                vec![RawInput {
                    shape: vec![2, 1],
                    data: bytes_of(&[b"a", b"b"]),
                    ..text("")
                }],
                "input 'text_input': batch dimension 2",
            ),
            (vec![text("")], "input 'text_input': the prompt is empty"),
            (
                vec![text("a"), i32_input("max_tokens", 0)],
                "input 'max_tokens': must be at least 1, got 0",
            ),
            (
                vec![text("a"), i32_input("max_tokens", -3)],
                "input 'max_tokens': must be at least 1, got -3",
            ),
            (
                vec![text("a"), f32_input("temperature", f32::NAN)],
                "input 'temperature': must be a finite number",
            ),
            (
                vec![text("a"), f32_input("temperature", -1.0)],
                "input 'temperature'",
            ),
            (
                vec![text("a"), f32_input("top_p", 0.0)],
                "input 'top_p': must be in (0, 1], got 0",
            ),
            (
                vec![text("a"), f32_input("top_p", 1.5)],
                "input 'top_p': must be in (0, 1], got 1.5",
            ),
            (
                vec![text("a"), i32_input("top_k", -1)],
                "input 'top_k': must be 0 or more",
            ),
            (
                vec![RawInput {
                    data: bytes_of(&[b"\xff\xfe"]),
                    ..text("")
                }],
                "input 'text_input': element 0 is not valid UTF-8",
            ),
            (
                vec![text("a"), i32_input("input_ids", 3)],
                "give either text_input or input_ids, not both",
            ),
            (
                vec![RawInput {
                    data: vec![9, 0, 0, 0, b'a'],
                    ..text("")
                }],
                "input 'text_input': element 0 of 1: length 9 but only 1 bytes left",
            ),
            (
                vec![RawInput {
                    data: vec![1, 0],
                    ..text("")
                }],
                "ends before its 4-byte length",
            ),
            (
                vec![RawInput {
                    data: [bytes_of(&[b"a"]), vec![0]].concat(),
                    ..text("")
                }],
                "1 bytes of data after the 1 element(s)",
            ),
            (
                vec![text("a"), i32_input("max_token", 4)],
                "input 'max_token': unknown input",
            ),
            (
                vec![text("a"), text("b")],
                "input 'text_input': given twice",
            ),
            (
                vec![
                    text("a"),
                    RawInput {
                        data: vec![],
                        ..i32_input("max_tokens", 1)
                    },
                ],
                "0 bytes of data for one INT32 element",
            ),
            (
                vec![RawInput {
                    shape: vec![],
                    ..text("a")
                }],
                "a scalar shape [], but the model has a batch dimension",
            ),
            (
                vec![
                    RawInput {
                        name: "stream".into(),
                        datatype: DataType::Bool,
                        shape: vec![1, 1],
                        data: vec![2],
                    },
                    text("a"),
                ],
                "input 'stream': boolean byte 2",
            ),
            (
                vec![
                    text("a"),
                    RawInput {
                        name: "stop_words".into(),
                        datatype: DataType::Bytes,
                        shape: vec![1, 2],
                        data: bytes_of(&[b"x", b""]),
                    },
                ],
                "input 'stop_words': element 1 is empty",
            ),
            (
                vec![
                    text("a"),
                    RawInput {
                        name: "stop_token_ids".into(),
                        datatype: DataType::Int32,
                        shape: vec![1, 2],
                        data: [4i32, -1].iter().flat_map(|v| v.to_le_bytes()).collect(),
                    },
                ],
                "input 'stop_token_ids': element 1 is -1, not a token id",
            ),
            (
                vec![
                    text("a"),
                    RawInput {
                        name: "stop_token_ids".into(),
                        datatype: DataType::Int64,
                        shape: vec![1, 1],
                        data: 4i64.to_le_bytes().to_vec(),
                    },
                ],
                "input 'stop_token_ids': data type INT64, expected INT32",
            ),
        ];
        for (inputs, want) in cases {
            let got = err(&inputs);
            assert!(got.contains(want), "want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn model_checks() {
        let g = GenerateInputs::parse(&[text("abc"), i32_input("min_length", 5)], true).unwrap();
        let ok = g.check_against(&[1, 2], 8, 100, 10);
        assert!(ok.is_ok());
        let long = g
            .check_against(&[1; 10], 8, 100, 10)
            .unwrap_err()
            .to_string();
        assert!(
            long.contains("input 'text_input': the prompt has 10 tokens; the context holds 10"),
            "{long}"
        );
        let huge = g
            .check_against(&[1, 2], i32::MAX as usize, 100, 10)
            .unwrap_err()
            .to_string();
        assert!(
            huge.contains("input 'max_tokens': 2147483647 is more than the context of 10"),
            "{huge}"
        );
        let min = g
            .check_against(&[1, 2], 4, 100, 10)
            .unwrap_err()
            .to_string();
        assert!(
            min.contains("input 'min_length': 5 is more than max_tokens (4)"),
            "{min}"
        );
        let stops = GenerateInputs {
            stop_token_ids: vec![3, 100],
            ..g.clone()
        };
        let outside = stops
            .check_against(&[1, 2], 8, 100, 10)
            .unwrap_err()
            .to_string();
        assert!(
            outside.contains("input 'stop_token_ids': element 1 is 100, outside the vocabulary"),
            "{outside}"
        );
        let empty = g.check_against(&[], 4, 100, 10).unwrap_err().to_string();
        assert!(empty.contains("empty after tokenization"), "{empty}");
    }
}
