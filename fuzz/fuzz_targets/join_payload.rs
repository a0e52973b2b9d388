//! The payload of the `room` event: any JSON is a valid join or refused, and
//! a valid join names a valid room and, if any, a stream id that prints back
//! to itself.
#![no_main]

use chat_ha::message::{JoinRequest, Room, StreamId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(join) = JoinRequest::from_json(&value)
    {
        assert!(Room::parse(join.room.as_str()).is_ok());
        if let Some(since) = join.since {
            assert_eq!(StreamId::parse(&since.to_string()), Some(since));
        }
    }
});
