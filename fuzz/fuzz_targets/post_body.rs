//! Request bodies of `POST /back/message` and `POST /back/publish`: any bytes
//! either parse into a message that passes every check or are refused, and
//! what passes really does satisfy the rules.
#![no_main]

use chat_ha::message::{
    MAX_MESSAGE_CHARS, PostBody, PostMessage, Publish, PublishBody, Room, check_text, parse_object,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = parse_object::<PostBody>(data)
        && let Ok(message) = PostMessage::try_from(body)
    {
        assert!(Room::parse(message.room.as_str()).is_ok());
        assert!(check_text(&message.text).is_ok());
        assert!(message.text.chars().count() <= MAX_MESSAGE_CHARS);
    }
    if let Ok(body) = parse_object::<PublishBody>(data)
        && let Ok(publish) = Publish::try_from(body)
    {
        assert!(!publish.rooms.is_empty() && publish.rooms.len() <= 64);
    }
});
