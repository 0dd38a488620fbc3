//! Which settings of a run changed: the top-level fields of two serializable configs whose
//! values differ (a resumed run checks its saved config against the given one with it).
use serde::Serialize;
use serde_json::Value;

/// One field whose value differs between two configs.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldChange {
    /// The field name (serde's).
    pub key: String,
    /// Its value in the first config.
    pub a: Value,
    /// Its value in the second (`null` when absent there).
    pub b: Value,
}

impl FieldChange {
    /// A value as a person reads it in a message: strings bare, `null` as "the default",
    /// anything else as JSON.
    ///
    /// ```
    /// use keel_train::FieldChange;
    /// assert_eq!(FieldChange::show(&serde_json::json!("gn")), "gn");
    /// assert_eq!(FieldChange::show(&serde_json::Value::Null), "the default");
    /// assert_eq!(FieldChange::show(&serde_json::json!(0.5)), "0.5");
    /// ```
    pub fn show(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Null => "the default".into(),
            v => v.to_string(),
        }
    }
}

/// The top-level fields of `a` (a struct or map) whose serialized values differ from
/// `b`'s, sorted by name. An error when either does not serialize to a JSON object.
///
/// ```
/// #[derive(serde::Serialize)]
/// struct Cfg { lr: f64, steps: usize, norm: &'static str }
/// let old = Cfg { lr: 0.1, steps: 10, norm: "gn" };
/// let new = Cfg { lr: 0.1, steps: 20, norm: "bn" };
/// let keys: Vec<String> = keel_train::changed_fields(&new, &old)?.into_iter().map(|c| c.key).collect();
/// assert_eq!(keys, ["norm", "steps"]);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn changed_fields(a: &impl Serialize, b: &impl Serialize) -> candle::Result<Vec<FieldChange>> {
    let (a, b) = (object(a, "first")?, object(b, "second")?);
    Ok(a.into_iter()
        .filter_map(|(key, va)| {
            let vb = b.get(&key).cloned().unwrap_or(Value::Null);
            (va != vb).then_some(FieldChange { key, a: va, b: vb })
        })
        .collect())
}

/// `v` as a JSON object.
fn object(v: &impl Serialize, which: &str) -> candle::Result<serde_json::Map<String, Value>> {
    let v = serde_json::to_value(v)
        .map_err(|e| candle::Error::Msg(format!("changed_fields: the {which} config: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        other => candle::bail!(
            "changed_fields: the {which} config serializes to {other}, not an object; pass a struct or a map"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_read_as_null_and_non_objects_are_errors() -> candle::Result<()> {
        let a = serde_json::json!({"x": 1, "y": null, "z": [1, 2]});
        let b = serde_json::json!({"x": 1, "z": [1, 3]});
        let c = changed_fields(&a, &b)?;
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].key.as_str(), &c[0].b),
            ("z", &serde_json::json!([1, 3]))
        );
        let err = changed_fields(&3, &b).unwrap_err().to_string();
        assert!(
            err.contains("the first config serializes to 3, not an object"),
            "{err}"
        );
        Ok(())
    }
}
