//! Python's text conventions, reproduced where cn_clip's output depends on them.
//!
//! cn_clip writes its score file with `json.dump` (`", "`/`": "` separators, `ensure_ascii=True`,
//! floats as `float.__repr__`) and builds error messages with `str.format`, which prints JSON values
//! the way Python prints the objects `json.loads` made of them. Matching those bytes is what lets a
//! score file from this crate be compared with cn_clip's byte for byte.

use serde_json::Value;

/// `float.__repr__`: the shortest digits that round-trip, in fixed notation when the decimal
/// exponent is in `-4..16` and in `1e-05` / `1.5e+16` notation otherwise.
///
/// Rust's `{}` never switches to exponent notation, so the exponent form is rebuilt from `{:e}`,
/// which yields the same shortest digits.
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        if exp < 0 {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        } else if exp + 1 >= n {
            let zeros = "0".repeat((exp + 1 - n) as usize);
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs())
    }
}

/// `repr()` of a Python `str`: single quotes unless the text holds `'` and no `"`, escapes for
/// backslash, the quote, `\t\n\r` and non-printable characters.
fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `str()` of the Python object `json.loads` makes of `v` (`None`, `True`, `1.5`, `abc`, `[1, 'a']`,
/// `{'a': 1}`), as `'{}'.format(v)` prints it inside cn_clip's messages.
pub(crate) fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (None, None, Some(f)) => float_repr(f),
            (None, None, None) => n.to_string(),
        },
        Value::String(s) => str_repr(s),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(py_repr).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", str_repr(k), py_repr(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

/// Python's type name of the object `json.loads` makes of `v`, as it appears in `TypeError`s.
pub(crate) fn py_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// A JSON string literal as `json.dumps` writes it with `ensure_ascii=True`: everything outside
/// printable ASCII becomes `\uXXXX` (UTF-16 surrogate pairs above the BMP).
pub(crate) fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// A JSON value as `json.dumps` writes it (default separators, `ensure_ascii=True`, key order kept
/// as given, floats as `float.__repr__`).
pub(crate) fn json_value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, Some(f)) => out.push_str(&float_repr(f)),
            (None, None, None) => out.push_str(&n.to_string()),
        },
        Value::String(s) => json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                json_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                json_string(k, out);
                out.push_str(": ");
                json_value(item, out);
            }
            out.push('}');
        }
    }
}

/// Python's `str.strip()` with no argument: `str.isspace` characters, which are Rust's
/// `char::is_whitespace` plus the separators U+001C..U+001F.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        // Values checked against CPython 3.11 `repr`.
        let cases = [
            (0.0, "0.0"),
            (100.0, "100.0"),
            (1.0 / 3.0 * 100.0, "33.33333333333333"),
            (2.0 / 3.0, "0.6666666666666666"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-0.5, "-0.5"),
            (f64::from(0.0198f32), "0.01979999989271164"),
            (f64::from(-1.5e-5f32), "-1.4999999621068127e-05"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn str_and_json_follow_python() {
        let v: Value = serde_json::from_str(r#"[null, true, 1.0, "it's", {"a": "x\"y"}]"#).unwrap();
        assert_eq!(py_str(&v), r#"[None, True, 1.0, "it's", {'a': 'x"y'}]"#);
        let mut out = String::new();
        json_string("价\u{1F600}\n\u{7f}", &mut out);
        assert_eq!(out, r#""\u4ef7\ud83d\ude00\n\u007f""#);
        assert_eq!(py_strip("\u{1f} x \u{a0}\u{3000}"), "x");
    }
}
