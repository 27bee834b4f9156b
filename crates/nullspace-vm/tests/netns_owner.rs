//! A server's machine network namespaces are found by its data directory
//! alone: [`net::release_owner`] removes every one of them (what a server
//! gone for good leaves, e.g. a test's) and no other server's, however the
//! directory is spelt and whether or not it still exists. Needs root.

use nullspace_vm::net::{self, HostNet, NETNS_FILE};
use std::path::Path;

fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn release_owner_removes_that_servers_namespaces_only() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut made = vec![];
    for (owner, ids) in [(&a, &["mch_1", "mch_2"][..]), (&b, &["mch_1"][..])] {
        let host = HostNet::init(owner, None).expect("host networking (root, ip, nft)");
        for id in ids {
            let dir = owner.join("machines").join(id);
            std::fs::create_dir_all(&dir).unwrap();
            host.create(id, &dir).expect("namespace");
            let name = std::fs::read_to_string(dir.join(NETNS_FILE)).unwrap();
            assert!(exists(&name), "{name} was not made");
            made.push(name);
        }
    }
    let (a_names, b_name) = (&made[..2], &made[2]);
    // Spelt another way, and gone from disk: still the same owner.
    let a_other = tmp.path().join("b/../a");
    std::fs::remove_dir_all(&a).unwrap();
    let mut gone = net::release_owner(&a_other);
    gone.sort();
    assert_eq!(gone, a_names, "released for {}", a.display());
    for n in a_names {
        assert!(!exists(n), "{n} is left");
    }
    assert!(exists(b_name), "another server's {b_name} went too");
    assert_eq!(net::release_owner(&b), std::slice::from_ref(b_name));
    assert!(!exists(b_name), "{b_name} is left");
}
