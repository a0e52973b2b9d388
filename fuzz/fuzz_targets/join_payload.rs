//! The payload of the `room` event, against what the README documents,
//! checked here without the library's own validation:
//!
//! - a payload is accepted exactly when it is a room name, or an object
//!   with a room name and, optionally, `since`: a message id
//!   `<milliseconds>-<sequence>` (two unsigned 64-bit numbers) or null; a
//!   room name matches `^[A-Za-z0-9_.-]{1,64}$`;
//! - what is accepted is what was sent;
//! - an accepted join written back as a payload parses to the same join.
#![no_main]

use chat_ha::message::JoinRequest;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let accepted = JoinRequest::from_json(&value).ok();
    let documented = documented_join(&value);
    let join = match (accepted, &documented) {
        (Some(join), Some((room, since))) => {
            let got_since = join.since.map(|id| (id.ms, id.seq));
            assert_eq!((join.room.as_str(), got_since), (room.as_str(), *since));
            join
        }
        (None, None) => return,
        (accepted, _) => {
            panic!("accepted {accepted:?}, but the documented rules say {documented:?}")
        }
    };
    let written = match join.since {
        None => json!(join.room.as_str()),
        Some(since) => json!({"room": join.room.as_str(), "since": since.to_string()}),
    };
    assert_eq!(
        JoinRequest::from_json(&written),
        Ok(join),
        "written back as {written}"
    );
});

/// The room and `since` (milliseconds, sequence) of a payload that follows
/// the documented forms; `None` for one that does not.
fn documented_join(value: &Value) -> Option<(String, Option<(u64, u64)>)> {
    match value {
        Value::String(room) => documented_room(room).then(|| (room.clone(), None)),
        Value::Object(fields) => {
            if fields.keys().any(|k| k != "room" && k != "since") {
                return None;
            }
            let room = fields
                .get("room")?
                .as_str()
                .filter(|r| documented_room(r))?;
            let since = match fields.get("since") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) => Some(message_id(id)?),
                Some(_) => return None,
            };
            Some((room.to_owned(), since))
        }
        _ => None,
    }
}

/// `^[A-Za-z0-9_.-]{1,64}$`, the README's pattern for room names.
fn documented_room(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    (1..=64).contains(&name.chars().count()) && name.chars().all(allowed)
}

/// A message id: decimal milliseconds and sequence, each fitting 64 bits,
/// joined by `-`.
fn message_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok()
    };
    Some((number(ms)?, number(seq)?))
}
