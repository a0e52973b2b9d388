//! Request bodies of `POST /back/message` and `POST /back/publish`, against
//! what the README documents, checked here without the library's own
//! validation:
//!
//! - a body is accepted exactly when it is one JSON object with the
//!   documented fields, each once and of the right type, and values that
//!   follow the rules: a room matching `^[A-Za-z0-9_.-]{1,64}$`, a message
//!   that is not blank and has at most 4000 characters, 1 to 64 rooms;
//! - what is accepted is what was sent (a publish names each room once);
//! - an accepted body written back as JSON parses to the same message.
#![no_main]

use chat_ha::message::{PostBody, PostMessage, Publish, PublishBody, parse_object};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let fields = serde_json::from_slice::<Fields>(data).ok();
    check_post(data, fields.as_ref());
    check_publish(data, fields.as_ref());
});

/// `POST /back/message`: `{"room": R, "message": M}`.
fn check_post(data: &[u8], fields: Option<&Fields>) {
    let accepted = parse_object::<PostBody>(data)
        .ok()
        .and_then(|body| PostMessage::try_from(body).ok());
    let documented = fields.and_then(documented_post);
    match (&accepted, &documented) {
        (Some(message), Some((room, text))) => {
            assert_eq!(
                (message.room.as_str(), message.text.as_str()),
                (room.as_str(), text.as_str())
            );
        }
        (None, None) => return,
        _ => panic!("accepted {accepted:?}, but the documented rules say {documented:?}"),
    }
    let message = accepted.expect("matched above");
    let written = json!({"room": message.room.as_str(), "message": message.text}).to_string();
    let again = parse_object::<PostBody>(written.as_bytes())
        .map_err(|e| e.to_string())
        .and_then(|body| PostMessage::try_from(body).map_err(|e| e.to_string()));
    assert_eq!(again, Ok(message), "written back as {written}");
}

/// `POST /back/publish`: `{"rooms": [R, ...], "message": M}`.
fn check_publish(data: &[u8], fields: Option<&Fields>) {
    let accepted = parse_object::<PublishBody>(data)
        .ok()
        .and_then(|body| Publish::try_from(body).ok());
    let documented = fields.and_then(documented_publish);
    match (&accepted, &documented) {
        (Some(publish), Some((rooms, text))) => {
            let got: Vec<&str> = publish.rooms.iter().map(|r| r.as_str()).collect();
            assert_eq!(got, *rooms, "each room named, once, in order");
            assert_eq!(publish.text, *text);
        }
        (None, None) => return,
        _ => panic!("accepted {accepted:?}, but the documented rules say {documented:?}"),
    }
    let publish = accepted.expect("matched above");
    let rooms: Vec<&str> = publish.rooms.iter().map(|r| r.as_str()).collect();
    let written = json!({"rooms": rooms, "message": publish.text}).to_string();
    let again = parse_object::<PublishBody>(written.as_bytes())
        .map_err(|e| e.to_string())
        .and_then(|body| Publish::try_from(body).map_err(|e| e.to_string()));
    assert_eq!(again, Ok(publish), "written back as {written}");
}

/// The room and text of a body that follows the rules of `POST
/// /back/message`; `None` for one that does not.
fn documented_post(fields: &Fields) -> Option<(String, String)> {
    let [room, message] = fields.exactly(["room", "message"])?;
    let (Value::String(room), Value::String(text)) = (room, message) else {
        return None;
    };
    (documented_room(room) && documented_text(text)).then(|| (room.clone(), text.clone()))
}

/// The distinct rooms (in order) and text of a body that follows the rules
/// of `POST /back/publish`; `None` for one that does not.
fn documented_publish(fields: &Fields) -> Option<(Vec<&str>, String)> {
    let [rooms, message] = fields.exactly(["rooms", "message"])?;
    let (Value::Array(rooms), Value::String(text)) = (rooms, message) else {
        return None;
    };
    if !(1..=64).contains(&rooms.len()) || !documented_text(text) {
        return None;
    }
    let mut distinct: Vec<&str> = Vec::new();
    for room in rooms {
        let room = room.as_str().filter(|r| documented_room(r))?;
        if !distinct.contains(&room) {
            distinct.push(room);
        }
    }
    Some((distinct, text.clone()))
}

/// `^[A-Za-z0-9_.-]{1,64}$`, the README's pattern for room names.
fn documented_room(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    (1..=64).contains(&name.chars().count()) && name.chars().all(allowed)
}

/// Not blank, at most 4000 characters: the README's rule for a message.
fn documented_text(text: &str) -> bool {
    !text.chars().all(char::is_whitespace) && text.chars().count() <= 4000
}

/// A JSON object's members as sent: every key, duplicates included, in
/// order (serde_json's `Value` keeps only the last of a repeated key).
#[derive(Debug)]
struct Fields(Vec<(String, Value)>);

impl Fields {
    /// The values of exactly the keys `names`, each present once, no other key.
    fn exactly<const N: usize>(&self, names: [&str; N]) -> Option<[&Value; N]> {
        if self.0.len() != N {
            return None;
        }
        let mut found: [Option<&Value>; N] = [None; N];
        for (key, value) in &self.0 {
            let slot = names.iter().position(|n| n == key)?;
            if found[slot].replace(value).is_some() {
                return None;
            }
        }
        Some(found.map(|v| v.expect("N distinct keys of N")))
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Fields(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}
