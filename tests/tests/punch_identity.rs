//! Issue 14 over real loopback sockets through the binary (no root): key files, a pinned
//! `--peer-key`, and an id hijack refused while the connector still reaches the key it named.

use std::time::Duration;

use natscope_tests::punch::{
    finish, loopback_server as server, natscope_here as natscope, wait_for,
};
use natscope_tests::ChildProcess;

/// The key a listener printed in its `registered` line.
fn printed_key(l: &ChildProcess) -> String {
    let out = l.stdout();
    let line = out
        .lines()
        .find(|l| l.starts_with("registered"))
        .unwrap_or_else(|| panic!("no registered line\n{}", l.diagnostics()));
    line.rsplit("key ")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn a_key_file_is_created_private_and_a_readable_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (_server, addr) = server();
    let dir = natscope_tests::TempDir::new("nois-keyfile");
    let key = dir.path().join("bob.key");
    let k = key.to_str().expect("utf-8 path");
    let mut l = natscope(&["punch", "listen", "--id", "bob", "--via", &addr, "--key", k]);
    wait_for(&mut l, |p| p.stdout().contains("registered"), "registered");
    let first = printed_key(&l);
    l.kill();
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The same file is the same identity.
    let mut l = natscope(&["punch", "listen", "--id", "bob", "--via", &addr, "--key", k]);
    wait_for(&mut l, |p| p.stdout().contains("registered"), "registered");
    assert_eq!(printed_key(&l), first);
    l.kill();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut l = natscope(&["punch", "listen", "--id", "bob", "--via", &addr, "--key", k]);
    assert_ne!(
        finish(&mut l, Duration::from_secs(10)),
        0,
        "{}",
        l.diagnostics()
    );
    assert!(l.stderr().contains("chmod 600"), "{}", l.diagnostics());
}

#[test]
fn a_hijacked_id_is_refused_and_a_pinned_connector_reaches_only_the_key_it_named() {
    let (_server, addr) = server();
    let mut bob = natscope(&[
        "punch", "listen", "--id", "bob", "--via", &addr, "--count", "1",
    ]);
    wait_for(
        &mut bob,
        |p| p.stdout().contains("registered"),
        "registered",
    );
    let bob_key = printed_key(&bob);
    // Mallory (another key) tries to take "bob": the server refuses.
    let mut mallory = natscope(&["punch", "listen", "--id", "bob", "--via", &addr]);
    assert_eq!(
        finish(&mut mallory, Duration::from_secs(10)),
        2,
        "{}",
        mallory.diagnostics()
    );
    assert!(
        mallory.stderr().contains("held by another key"),
        "{}",
        mallory.diagnostics()
    );
    // A connector pinning another key refuses, with one line, whatever the server says.
    let other = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
    let mut c = natscope(&[
        "punch",
        "connect",
        "bob",
        "--via",
        &addr,
        "--peer-key",
        other,
    ]);
    assert_eq!(
        finish(&mut c, Duration::from_secs(15)),
        1,
        "{}",
        c.diagnostics()
    );
    let err = c.stderr();
    assert!(err.contains("not the --peer-key"), "{}", c.diagnostics());
    assert_eq!(err.lines().count(), 1, "{}", c.diagnostics());
    // Pinning bob's key reaches bob.
    let mut c = natscope(&[
        "punch",
        "connect",
        "bob",
        "--via",
        &addr,
        "--peer-key",
        &bob_key,
    ]);
    assert_eq!(
        finish(&mut c, Duration::from_secs(15)),
        0,
        "{}",
        c.diagnostics()
    );
    assert_eq!(
        finish(&mut bob, Duration::from_secs(15)),
        0,
        "{}",
        bob.diagnostics()
    );
}

#[test]
fn a_connector_given_several_servers_uses_one_that_answers() {
    // Issue 14 item 2 (partial): a server killed before the connect is skipped.
    let (mut dead, dead_addr) = server();
    dead.kill();
    let (_live, addr) = server();
    let mut bob = natscope(&[
        "punch", "listen", "--id", "bob", "--via", &addr, "--count", "1",
    ]);
    wait_for(
        &mut bob,
        |p| p.stdout().contains("registered"),
        "registered",
    );
    let key = printed_key(&bob);
    let args = [
        "punch",
        "connect",
        "bob",
        "--via",
        &dead_addr,
        "--via",
        &addr,
        "--peer-key",
        &key,
    ];
    let mut c = natscope(&args);
    assert_eq!(
        finish(&mut c, Duration::from_secs(20)),
        0,
        "{}",
        c.diagnostics()
    );
    assert_eq!(
        finish(&mut bob, Duration::from_secs(15)),
        0,
        "{}",
        bob.diagnostics()
    );
}

#[test]
fn a_listener_registers_with_every_server_and_is_reached_through_any() {
    // Issue 14 item 2 (partial): two `punch serve` with no shared state; the listener registers
    // with both; one is killed and the listener is still reached through the other.
    let (mut first, a) = server();
    let (_second, b) = server();
    let largs = [
        "punch", "listen", "--id", "bob", "--via", &a, "--via", &b, "--count", "2",
    ];
    let mut bob = natscope(&largs);
    wait_for(
        &mut bob,
        |p| p.stdout().matches("registered").count() == 2,
        "registered twice",
    );
    let key = printed_key(&bob);
    let mut c = natscope(&["punch", "connect", "bob", "--via", &a, "--peer-key", &key]);
    assert_eq!(
        finish(&mut c, Duration::from_secs(20)),
        0,
        "{}",
        c.diagnostics()
    );
    first.kill();
    let mut c = natscope(&["punch", "connect", "bob", "--via", &b, "--peer-key", &key]);
    assert_eq!(
        finish(&mut c, Duration::from_secs(20)),
        0,
        "{}",
        c.diagnostics()
    );
    assert_eq!(
        finish(&mut bob, Duration::from_secs(15)),
        0,
        "{}",
        bob.diagnostics()
    );
}
