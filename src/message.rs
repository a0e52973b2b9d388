//! What the system accepts: room names, message texts, join requests, and the
//! message as it is stored and delivered.
//!
//! Everything that comes from outside (an HTTP body, a Socket.IO event) is
//! turned into these types here, once; past this module, a [`Room`] is always
//! a valid room name and a [`PostMessage`] always a message worth storing.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest room name, in bytes (room names are ASCII).
pub const MAX_ROOM_LEN: usize = 64;
/// Longest message, in characters (Unicode scalar values).
pub const MAX_MESSAGE_CHARS: usize = 4000;

/// Why some input was refused. The text is shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("room must be 1 to {MAX_ROOM_LEN} characters of A-Z, a-z, 0-9, '_', '.' or '-'")]
    Room,
    #[error("message must not be empty")]
    EmptyMessage,
    #[error("message is longer than {MAX_MESSAGE_CHARS} characters")]
    LongMessage,
    #[error("join with a room name, or {{\"room\": name, \"since\": id}}")]
    JoinPayload,
    #[error("since must be a message id such as \"1700000000000-0\"")]
    Since,
    #[error("before must be a message id such as \"1700000000000-0\"")]
    Before,
    #[error(
        "Idempotency-Key must be 1 to {} visible ASCII characters",
        IdempotencyKey::MAX_LEN
    )]
    IdempotencyKey,
    #[error("rooms must list 1 to {MAX_PUBLISH_ROOMS} rooms")]
    PublishRooms,
}

/// A room name matching `^[A-Za-z0-9_.-]{1,64}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Room(String);

impl Room {
    pub fn parse(name: &str) -> Result<Self, InvalidInput> {
        let valid_char = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
        if (1..=MAX_ROOM_LEN).contains(&name.len()) && name.bytes().all(|b| valid_char(&b)) {
            Ok(Room(name.to_owned()))
        } else {
            Err(InvalidInput::Room)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Room {
    type Error = InvalidInput;
    fn try_from(name: String) -> Result<Self, InvalidInput> {
        Room::parse(&name)
    }
}

impl From<Room> for String {
    fn from(room: Room) -> String {
        room.0
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a message text: not blank, at most [`MAX_MESSAGE_CHARS`] characters.
pub fn check_text(text: &str) -> Result<(), InvalidInput> {
    if text.trim().is_empty() {
        Err(InvalidInput::EmptyMessage)
    } else if text.chars().count() > MAX_MESSAGE_CHARS {
        Err(InvalidInput::LongMessage)
    } else {
        Ok(())
    }
}

/// The body of `POST /back/message`, as received (not yet checked): a JSON
/// object with exactly the fields `room` and `message`, each once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostBody {
    pub room: String,
    pub message: String,
}

impl PostBody {
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        parse_object(bytes)
    }
}

/// Parses a request body that must be one JSON object: serde's derived
/// code alone would also read a struct from an array (`["room", "text"]`).
pub fn parse_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    struct ObjectOnly<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde::Deserializer::deserialize_map(
        &mut deserializer,
        ObjectOnly(std::marker::PhantomData),
    )?;
    deserializer.end()?;
    Ok(value)
}

/// The body of `POST /back/publish`: one text for several rooms.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    pub rooms: Vec<String>,
    pub message: String,
}

/// Most rooms one publish may name.
pub const MAX_PUBLISH_ROOMS: usize = 64;

/// A publish that passed every check: distinct valid rooms, a valid text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub rooms: Vec<Room>,
    pub text: String,
}

impl TryFrom<PublishBody> for Publish {
    type Error = InvalidInput;
    fn try_from(body: PublishBody) -> Result<Self, InvalidInput> {
        if body.rooms.is_empty() || body.rooms.len() > MAX_PUBLISH_ROOMS {
            return Err(InvalidInput::PublishRooms);
        }
        let mut rooms: Vec<Room> = Vec::with_capacity(body.rooms.len());
        for name in &body.rooms {
            let room = Room::parse(name)?;
            if !rooms.contains(&room) {
                rooms.push(room);
            }
        }
        check_text(&body.message)?;
        Ok(Publish {
            rooms,
            text: body.message,
        })
    }
}

/// A message that passed every check and may be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostMessage {
    pub room: Room,
    pub text: String,
}

impl TryFrom<PostBody> for PostMessage {
    type Error = InvalidInput;
    fn try_from(body: PostBody) -> Result<Self, InvalidInput> {
        let room = Room::parse(&body.room)?;
        check_text(&body.message)?;
        Ok(PostMessage {
            room,
            text: body.message,
        })
    }
}

/// The `Idempotency-Key` of a post: posting again with the same key (a
/// retry after a timeout, or the load balancer re-sending a request whose
/// connection failed) returns the message stored the first time instead of
/// storing it twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;

    pub fn parse(key: &str) -> Result<Self, InvalidInput> {
        let visible = |b: u8| (0x21..=0x7e).contains(&b);
        if (1..=Self::MAX_LEN).contains(&key.len()) && key.bytes().all(visible) {
            Ok(IdempotencyKey(key.to_owned()))
        } else {
            Err(InvalidInput::IdempotencyKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored message, as the backend returns it and the frontends deliver it.
///
/// `id` is the Redis stream id (`<ms>-<seq>`), increasing within a room; `ts`
/// is the millisecond part of it, the time Redis stored the message. In JSON
/// both the id and the room are strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub id: StreamId,
    pub room: Room,
    pub message: String,
    pub ts: u64,
}

impl ChatMessage {
    /// The message stored under stream id `id`.
    pub fn new(id: StreamId, room: Room, message: String) -> Self {
        ChatMessage {
            id,
            room,
            message,
            ts: id.ms,
        }
    }
}

/// A Redis stream id, `<milliseconds>-<sequence>`, ordered as Redis orders
/// them; a string in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidInput;
    fn try_from(id: String) -> Result<Self, InvalidInput> {
        StreamId::parse(&id).ok_or(InvalidInput::Since)
    }
}

/// Written straight into the output, without a `String` of its own: every
/// answer to a post and every delivery carries one.
impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// What a client sends with the `room` event: a room name, or an object
/// naming the room and the last message id the client has already seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub room: Room,
    pub since: Option<StreamId>,
}

impl JoinRequest {
    pub fn from_json(value: &serde_json::Value) -> Result<Self, InvalidInput> {
        use serde_json::Value;
        match value {
            Value::String(name) => Ok(JoinRequest {
                room: Room::parse(name)?,
                since: None,
            }),
            Value::Object(fields) => {
                if fields.keys().any(|k| k != "room" && k != "since") {
                    return Err(InvalidInput::JoinPayload);
                }
                let room = match fields.get("room") {
                    Some(Value::String(name)) => Room::parse(name)?,
                    _ => return Err(InvalidInput::JoinPayload),
                };
                let since = match fields.get("since") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(id)) => {
                        Some(StreamId::parse(id).ok_or(InvalidInput::Since)?)
                    }
                    Some(_) => return Err(InvalidInput::Since),
                };
                Ok(JoinRequest { room, since })
            }
            _ => Err(InvalidInput::JoinPayload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn room_names() {
        for ok in ["a", "rooma", "Room_1.test-2", &"x".repeat(64)] {
            assert!(Room::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", " ", "a b", "é", "a/b", "room!", &"x".repeat(65), "a\0"] {
            assert_eq!(Room::parse(bad), Err(InvalidInput::Room), "{bad:?}");
        }
    }

    #[test]
    fn error_texts_name_the_limits() {
        assert!(
            InvalidInput::Room
                .to_string()
                .contains("1 to 64 characters")
        );
        assert!(
            InvalidInput::LongMessage
                .to_string()
                .contains("4000 characters")
        );
        assert!(
            InvalidInput::IdempotencyKey
                .to_string()
                .contains("1 to 128")
        );
        assert!(
            InvalidInput::PublishRooms
                .to_string()
                .contains("1 to 64 rooms")
        );
    }

    #[test]
    fn message_texts() {
        assert!(check_text("hi").is_ok());
        assert!(check_text(&"é".repeat(4000)).is_ok());
        assert_eq!(check_text(""), Err(InvalidInput::EmptyMessage));
        assert_eq!(check_text(" \n\t"), Err(InvalidInput::EmptyMessage));
        assert_eq!(
            check_text(&"é".repeat(4001)),
            Err(InvalidInput::LongMessage)
        );
    }

    #[test]
    fn post_body_checks_room_then_text() {
        let post = |room: &str, message: &str| {
            PostMessage::try_from(PostBody {
                room: room.into(),
                message: message.into(),
            })
        };
        assert_eq!(post("rooma", "hi").unwrap().room.as_str(), "rooma");
        assert_eq!(post("bad room", "hi"), Err(InvalidInput::Room));
        assert_eq!(post("rooma", ""), Err(InvalidInput::EmptyMessage));
    }

    #[test]
    fn post_body_rejects_unknown_and_duplicate_fields_and_non_objects() {
        let parse = |s: &str| PostBody::from_json(s.as_bytes()).map_err(|e| e.to_string());
        assert!(parse(r#"{"room":"a","message":"b"}"#).is_ok());
        assert!(
            parse(r#"{"room":"a","message":"b","x":1}"#)
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(
            parse(r#"{"room":"a","room":"c","message":"b"}"#)
                .unwrap_err()
                .contains("duplicate field")
        );
        assert!(parse(r#"{"room":"a","message":1e999}"#).is_err());
        assert!(
            parse(r#"["a","b"]"#)
                .unwrap_err()
                .contains("expected an object")
        );
        assert!(parse(r#""a""#).is_err());
        assert!(
            parse(r#"{"room":"a","message":"b"} {}"#)
                .unwrap_err()
                .contains("trailing")
        );
    }

    #[test]
    fn idempotency_keys() {
        assert!(IdempotencyKey::parse("0A1B2C3D:1f90_7f000001:01BB").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(128)).is_ok());
        for bad in ["", " ", "a b", "é", &"k".repeat(129), "a\n"] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(InvalidInput::IdempotencyKey),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stream_ids_order_numerically() {
        let a = StreamId::parse("1700000000000-9").unwrap();
        let b = StreamId::parse("1700000000000-10").unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "1700000000000-10");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-1-1",
            "+",
            "99999999999999999999-0",
        ] {
            assert_eq!(StreamId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn chat_message_takes_its_time_from_the_id_and_is_strings_in_json() {
        let id = StreamId::parse("1700000000123-4").unwrap();
        let m = ChatMessage::new(id, Room::parse("r").unwrap(), "m".into());
        assert_eq!(m.ts, 1_700_000_000_123);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "1700000000123-4", "room": "r", "message": "m", "ts": 1_700_000_000_123u64})
        );
        assert_eq!(serde_json::from_value::<ChatMessage>(json).unwrap(), m);
        let bad = serde_json::json!({"id": "nope", "room": "r", "message": "m", "ts": 1});
        assert!(serde_json::from_value::<ChatMessage>(bad).is_err());
    }

    #[test]
    fn join_requests() {
        let join = |v: serde_json::Value| JoinRequest::from_json(&v);
        assert_eq!(join(json!("rooma")).unwrap().since, None);
        let with_since = join(json!({"room": "rooma", "since": "5-1"})).unwrap();
        assert_eq!(with_since.since, Some(StreamId { ms: 5, seq: 1 }));
        assert_eq!(
            join(json!({"room": "rooma"})).unwrap().room.as_str(),
            "rooma"
        );
        assert_eq!(join(json!("bad room")), Err(InvalidInput::Room));
        assert_eq!(join(json!(42)), Err(InvalidInput::JoinPayload));
        assert_eq!(join(json!(["rooma"])), Err(InvalidInput::JoinPayload));
        assert_eq!(join(json!({"room": 1})), Err(InvalidInput::JoinPayload));
        assert_eq!(
            join(json!({"room": "a", "x": 1})),
            Err(InvalidInput::JoinPayload)
        );
        assert_eq!(
            join(json!({"room": "a", "since": "x"})),
            Err(InvalidInput::Since)
        );
        assert_eq!(
            join(json!({"room": "a", "since": 3})),
            Err(InvalidInput::Since)
        );
    }
}
