//! Feeds arbitrary bytes from "the network" to the data-stream handshake parsers.
//!
//! Properties: nothing panics; an incomplete answer always asks for more than it was given and
//! never for more than the longest hello; a complete hello consumed at most what it was given,
//! its names pass validation, and it never verifies under a secret it was not made with.

#![no_main]

use katamaran::dataplane::handshake::{
    parse_client_hello, parse_server_hello, verify_client, Parsed, Secret, MAX_CLIENT_HELLO_LEN, SERVER_HELLO_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(buf) = <[u8; SERVER_HELLO_LEN]>::try_from(data.get(..SERVER_HELLO_LEN).unwrap_or_default()) {
        let _ = parse_server_hello(&buf);
    }
    match parse_client_hello(data) {
        Ok(Parsed::Incomplete(need)) => {
            assert!(need > data.len(), "asks for {need} with {} bytes in hand", data.len());
            assert!(need <= MAX_CLIENT_HELLO_LEN, "asks for {need}");
        }
        Ok(Parsed::Complete(hello, used)) => {
            assert!(used <= data.len());
            assert!(katamaran::dataplane::handshake::validate_migration_id(&hello.key.migration_id).is_ok());
            assert!(katamaran::dataplane::handshake::validate_stream(&hello.key.stream).is_ok());
            if let Ok(secret) = Secret::new(vec![0x5a; 32]) {
                // A random MAC matching a fixed secret and nonce would be a forgery.
                assert!(!verify_client(&secret, &[7; 32], &hello), "forged MAC verified");
            }
        }
        Err(_) => {}
    }
});
