//! The reflector's answer path allocates nothing per request (issue: "the receive-and-answer path
//! allocates nothing"). A counting global allocator watches the sans-IO core answer every kind of
//! request, plus the rate limiter. Only the measuring thread's allocations count: the test
//! harness's own thread may still be allocating (its bookkeeping after spawning the test) when the
//! measured window opens, which once made this test fail on a fresh CI machine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use natscope_core::client::{build_request, RequestOptions};
use natscope_core::reflector::rate_limit::{RateLimit, RateLimiter};
use natscope_core::reflector::{Action, Reflector, ReflectorConfig, Transport, MAX_RESPONSE};
use natscope_core::stun::{ChangeRequest, TransactionId};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread whose allocations are counted (const-initialized: reading it allocates
    /// nothing).
    static MEASURED: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if MEASURED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: forwards the caller's layout contract to the system allocator unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn answering_allocates_nothing() {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    let core = Reflector::new(ReflectorConfig {
        primary: sa("192.0.2.1:3478"),
        alternate: Some(sa("192.0.2.2:3479")),
        partner: None,
    });
    let t0 = Instant::now();
    let mut limiter = RateLimiter::new(RateLimit::default(), t0);
    // Every kind of request, prepared before counting starts.
    let mut requests = Vec::new();
    for change in [
        ChangeRequest::NONE,
        ChangeRequest::IP,
        ChangeRequest::PORT,
        ChangeRequest::BOTH,
    ] {
        for (padding, response_port, fingerprint) in [
            (None, None, false),
            (Some(512), None, true),
            (None, Some(4000), true),
        ] {
            for classic in [false, true] {
                let tid = if classic {
                    TransactionId::random_classic()
                } else {
                    TransactionId::random()
                };
                let mut buf = [0u8; 2048];
                let opts = RequestOptions {
                    change,
                    response_port,
                    padding,
                    fingerprint,
                };
                let n = build_request(&mut buf, &tid, &opts).unwrap();
                requests.push(buf[..n].to_vec());
            }
        }
    }
    requests.push(b"not stun at all".to_vec());
    let mut out = [0u8; MAX_RESPONSE];
    let from = sa("198.51.100.7:40000");
    let to = sa("192.0.2.1:3478");

    let mut answered = 0usize;
    MEASURED.with(|m| m.set(true));
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for round in 0..100u32 {
        for req in &requests {
            let now = t0 + std::time::Duration::from_micros(u64::from(round));
            if limiter.allow(now, from.ip()) {
                for transport in [Transport::Udp, Transport::Tcp] {
                    if let (Action::Send { .. }, _) =
                        core.answer(transport, from, to, req, &mut out, 0)
                    {
                        answered += 1;
                    }
                }
            }
        }
    }
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    MEASURED.with(|m| m.set(false));
    // The default limiter grants its burst of 400, so a few hundred requests get through.
    assert!(
        answered >= 400,
        "the loop really answered requests ({answered})"
    );
    assert_eq!(
        allocations, 0,
        "{allocations} allocations while answering {answered} requests"
    );
}
