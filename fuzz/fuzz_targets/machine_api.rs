//! Machine API bodies as the routes read them (create, exec, file
//! operations, modes): a body that parses serialises to JSON that parses to
//! the same value, and a parsed mode is a permission mode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_model::machine::{CreateMachineBody, ExecBody};
use nullspace_model::machine_files::{
    BatchManifest, PatternBody, PermissionsBody, RenameBody, ReplaceBody, parse_mode,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parses, prints, parses again: the two prints are the same JSON.
fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let printed = serde_json::to_value(&v).unwrap();
    let again: T = serde_json::from_value(printed.clone()).expect("a printed body parses");
    assert_eq!(serde_json::to_value(&again).unwrap(), printed);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(m) = parse_mode(s)
    {
        assert!(m <= 0o7777, "mode {m:o} from {s:?}");
    }
    round_trip::<CreateMachineBody>(data);
    round_trip::<ExecBody>(data);
    round_trip::<RenameBody>(data);
    round_trip::<PermissionsBody>(data);
    round_trip::<PatternBody>(data);
    round_trip::<ReplaceBody>(data);
    round_trip::<BatchManifest>(data);
});
