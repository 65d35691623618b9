//! A parser for protobuf text format, the syntax of Triton's `config.pbtxt`.
//!
//! It knows no schema: it turns the text into a tree of fields ([`Message`]) whose values are
//! scalars (strings, numbers, identifiers) or nested messages, in file order, with repeated
//! fields kept as repeated entries (`input [ {..}, {..} ]` and two `input {..}` blocks give the
//! same tree). [`crate::model_config`] applies Triton's schema on top.
//!
//! Supported: `name: value`, `name { ... }`, `name: { ... }`, `name < ... >`, lists `[a, b]`
//! (of scalars or messages), optional `,`/`;` separators, `#` comments, single- or
//! double-quoted strings with C escapes (adjacent strings concatenate), decimal/hex/float
//! numbers, `inf`/`nan`, identifiers (enum values, `true`/`false`). Not supported, because
//! model configs never use them: `[ext.name]` extension fields and `Any` expansion.

use std::fmt;

/// One scalar as written; its interpretation (string vs enum vs number) depends on the schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// A quoted string, escapes resolved (may hold any bytes).
    Str(Vec<u8>),
    /// A number literal as written (`-1`, `0x10`, `1.5e3`, `-inf`).
    Num(String),
    /// A bare identifier: an enum value, `true`, `false`, `inf`, `nan`.
    Ident(String),
}

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(Scalar),
    Message(Message),
}

/// A message: its fields in order; a repeated field appears once per element.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    pub fields: Vec<(String, Value)>,
}

impl Message {
    /// The values of field `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// A syntax error with its 1-based line and column.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ParseError {}

/// Parses a whole text-format message.
pub fn parse(text: &str) -> Result<Message, ParseError> {
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
    };
    let msg = p.fields(None)?;
    p.skip_ws();
    if p.pos < p.s.len() {
        return Err(p.err("unexpected character"));
    }
    Ok(msg)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, message: &str) -> ParseError {
        let before = &self.s[..self.pos.min(self.s.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        let found = match self.s.get(self.pos) {
            Some(&b) if b.is_ascii_graphic() => format!(" (found '{}')", b as char),
            Some(&b) => format!(" (found byte 0x{b:02x})"),
            None => " (found end of input)".to_string(),
        };
        ParseError {
            line,
            column,
            message: format!("{message}{found}"),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// Skips whitespace and `#` comments.
    fn skip_ws(&mut self) {
        while let Some(b) = self.peek() {
            if b.is_ascii_whitespace() {
                self.pos += 1;
            } else if b == b'#' {
                while let Some(c) = self.peek() {
                    if c == b'\n' {
                        break;
                    }
                    self.pos += 1;
                }
            } else {
                break;
            }
        }
    }

    /// Fields until `close` (or end of input when `None`).
    fn fields(&mut self, close: Option<u8>) -> Result<Message, ParseError> {
        let mut msg = Message::default();
        loop {
            self.skip_ws();
            match (self.peek(), close) {
                (None, None) => return Ok(msg),
                (None, Some(c)) => return Err(self.err(&format!("missing '{}'", c as char))),
                (Some(b), Some(c)) if b == c => {
                    self.pos += 1;
                    return Ok(msg);
                }
                _ => {}
            }
            if self.peek() == Some(b'[') {
                return Err(self.err("extension fields ([name]) are not supported"));
            }
            let name = self
                .ident()
                .ok_or_else(|| self.err("expected a field name"))?;
            self.skip_ws();
            let colon = self.peek() == Some(b':');
            if colon {
                self.pos += 1;
                self.skip_ws();
            }
            match self.peek() {
                Some(b'{') | Some(b'<') => {
                    let m = self.message()?;
                    msg.fields.push((name, Value::Message(m)));
                }
                Some(b'[') => {
                    self.pos += 1;
                    self.list(&name, &mut msg)?;
                }
                _ if colon => {
                    let v = self.scalar()?;
                    msg.fields.push((name, Value::Scalar(v)));
                }
                _ => return Err(self.err(&format!("expected ':' or '{{' after field '{name}'"))),
            }
            self.skip_ws();
            if matches!(self.peek(), Some(b',') | Some(b';')) {
                self.pos += 1;
            }
        }
    }

    /// `{ ... }` or `< ... >`, the opening bracket at `pos`.
    fn message(&mut self) -> Result<Message, ParseError> {
        let close = match self.peek() {
            Some(b'{') => b'}',
            Some(b'<') => b'>',
            _ => return Err(self.err("expected '{' or '<'")),
        };
        self.pos += 1;
        self.fields(Some(close))
    }

    /// The elements of `[ ... ]` after the `[`, each pushed as a repeated `name`.
    fn list(&mut self, name: &str, msg: &mut Message) -> Result<(), ParseError> {
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            let v = match self.peek() {
                Some(b'{') | Some(b'<') => Value::Message(self.message()?),
                _ => Value::Scalar(self.scalar()?),
            };
            msg.fields.push((name.to_string(), v));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']' in a list")),
            }
        }
    }

    fn ident(&mut self) -> Option<String> {
        let start = self.pos;
        match self.peek() {
            Some(b) if b.is_ascii_alphabetic() || b == b'_' => self.pos += 1,
            _ => return None,
        }
        while let Some(b) = self.peek() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
                self.pos += 1;
            } else {
                break;
            }
        }
        Some(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn scalar(&mut self) -> Result<Scalar, ParseError> {
        match self.peek() {
            Some(b'"') | Some(b'\'') => {
                let mut out = Vec::new();
                // Adjacent string literals concatenate, as in C.
                while let Some(q @ (b'"' | b'\'')) = self.peek() {
                    self.string(q, &mut out)?;
                    self.skip_ws();
                }
                Ok(Scalar::Str(out))
            }
            Some(b) if b == b'-' || b == b'+' || b == b'.' || b.is_ascii_digit() => {
                let start = self.pos;
                self.pos += 1;
                while let Some(c) = self.peek() {
                    let exp_sign = (c == b'-' || c == b'+')
                        && matches!(self.s[self.pos - 1], b'e' | b'E')
                        && !self.s[start..self.pos].starts_with(b"0x");
                    if c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || exp_sign {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
                if !is_number(&text) {
                    self.pos = start;
                    return Err(self.err(&format!("malformed number '{text}'")));
                }
                Ok(Scalar::Num(text))
            }
            _ => self
                .ident()
                .map(Scalar::Ident)
                .ok_or_else(|| self.err("expected a value")),
        }
    }

    /// One quoted string starting at `pos` (the quote), escapes resolved into `out`.
    fn string(&mut self, quote: u8, out: &mut Vec<u8>) -> Result<(), ParseError> {
        self.pos += 1;
        loop {
            let Some(b) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            self.pos += 1;
            match b {
                b'\n' => {
                    self.pos -= 1;
                    return Err(self.err("newline in a string"));
                }
                b if b == quote => return Ok(()),
                b'\\' => self.escape(out)?,
                b => out.push(b),
            }
        }
    }

    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), ParseError> {
        let Some(e) = self.peek() else {
            return Err(self.err("unterminated escape"));
        };
        self.pos += 1;
        let simple = match e {
            b'n' => Some(b'\n'),
            b't' => Some(b'\t'),
            b'r' => Some(b'\r'),
            b'a' => Some(0x07),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'v' => Some(0x0b),
            b'\\' => Some(b'\\'),
            b'\'' => Some(b'\''),
            b'"' => Some(b'"'),
            b'?' => Some(b'?'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            return Ok(());
        }
        match e {
            b'x' | b'X' => {
                let mut v: u32 = 0;
                let mut n = 0;
                while n < 2 {
                    match self.peek().and_then(|c| (c as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            self.pos += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                if n == 0 {
                    return Err(self.err("\\x needs hex digits"));
                }
                out.push(v as u8);
            }
            b'0'..=b'7' => {
                let mut v: u32 = u32::from(e - b'0');
                let mut n = 1;
                while n < 3 {
                    match self.peek() {
                        Some(c @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(c - b'0');
                            self.pos += 1;
                            n += 1;
                        }
                        _ => break,
                    }
                }
                if v > 0xff {
                    return Err(self.err("octal escape above \\377"));
                }
                out.push(v as u8);
            }
            _ => {
                self.pos -= 1;
                return Err(self.err("unknown escape"));
            }
        }
        Ok(())
    }
}

/// Whether `t` is a number literal text format accepts (integers in decimal, hex or octal,
/// floats with an optional `f` suffix, `inf`/`nan` with a sign).
fn is_number(t: &str) -> bool {
    let body = t.strip_prefix(['-', '+']).unwrap_or(t);
    if body.is_empty() {
        return false;
    }
    let lower = body.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        return true;
    }
    if let Some(hex) = lower.strip_prefix("0x") {
        return !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    let float = lower.strip_suffix('f').unwrap_or(&lower);
    float.parse::<f64>().is_ok() && float.chars().next().is_some_and(|c| c != '+' && c != '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::Scalar(Scalar::Str(v.as_bytes().to_vec()))
    }
    fn n(v: &str) -> Value {
        Value::Scalar(Scalar::Num(v.into()))
    }
    fn id(v: &str) -> Value {
        Value::Scalar(Scalar::Ident(v.into()))
    }

    #[test]
    fn scalars_messages_and_lists() {
        let m = parse(
            r#"
            name: "m"  # a comment
            max_batch_size: 1
            model_transaction_policy { decoupled: true }
            input [
              { name: "a" dims: [ 1 ] optional: true },
              { name: "b", dims: [-1, 4] }
            ]
            instance_group: [ { kind: KIND_GPU gpus: [0, 1] } ];
            parameters < key: "k" value: { string_value: 'v' } >
            "#,
        )
        .unwrap();
        let names: Vec<_> = m.fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "name",
                "max_batch_size",
                "model_transaction_policy",
                "input",
                "input",
                "instance_group",
                "parameters"
            ]
        );
        assert_eq!(m.fields[0].1, s("m"));
        assert_eq!(m.fields[1].1, n("1"));
        let Value::Message(pol) = &m.fields[2].1 else {
            panic!()
        };
        assert_eq!(pol.fields, [("decoupled".to_string(), id("true"))]);
        let Value::Message(b) = &m.fields[4].1 else {
            panic!()
        };
        assert_eq!(
            b.all("dims").cloned().collect::<Vec<_>>(),
            [n("-1"), n("4")]
        );
        let Value::Message(g) = &m.fields[5].1 else {
            panic!()
        };
        assert_eq!(g.all("gpus").count(), 2);
        assert_eq!(g.fields[0].1, id("KIND_GPU"));
    }

    #[test]
    fn repeated_blocks_equal_a_list() {
        let a = parse(r#"input { name: "x" } input { name: "y" }"#).unwrap();
        let b = parse(r#"input [ { name: "x" }, { name: "y" } ]"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(parse("dims: [ ]").unwrap().fields.len(), 0);
    }

    #[test]
    fn string_escapes_and_concatenation() {
        let m = parse(r#"a: "q\"\n\t\\\x41\101\'" b: 'x' "y" c: "\xff\0""#).unwrap();
        assert_eq!(m.fields[0].1, s("q\"\n\t\\AA'"));
        assert_eq!(m.fields[1].1, s("xy"));
        assert_eq!(m.fields[2].1, Value::Scalar(Scalar::Str(vec![0xff, 0])));
    }

    #[test]
    fn numbers() {
        let m = parse("a: -1 b: 0x1F c: 1.5e-3 d: -inf e: 2.0f f: .5").unwrap();
        let got: Vec<_> = m.fields.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(
            got,
            [
                n("-1"),
                n("0x1F"),
                n("1.5e-3"),
                n("-inf"),
                n("2.0f"),
                n(".5")
            ]
        );
    }

    #[test]
    fn errors_say_where() {
        let e = parse("name: \"m\"\nmax_batch_size 1").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("expected ':' or '{'"), "{e}");
        let e = parse("a { b: 1").unwrap_err();
        assert!(e.message.contains("missing '}'"), "{e}");
        let e = parse("a: \"x").unwrap_err();
        assert!(e.message.contains("unterminated string"), "{e}");
        let e = parse("a: 1x2").unwrap_err();
        assert!(e.message.contains("malformed number"), "{e}");
        let e = parse("a: [1, 2").unwrap_err();
        assert!(e.message.contains("expected ',' or ']'"), "{e}");
        let e = parse("a: \"\\q\"").unwrap_err();
        assert!(e.message.contains("unknown escape"), "{e}");
        let e = parse("}").unwrap_err();
        assert!(e.message.contains("expected a field name"), "{e}");
    }
}
