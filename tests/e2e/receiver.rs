//! The loopback webhook receiver for tests of webhook deliveries: `shoal::dev::receiver`,
//! shared with the outbox's unit tests. `Receiver::start(secret)` listens on 127.0.0.1:0,
//! records every request (`requests()`, `distinct_ids()`, `wait_for(n, timeout)`), verifies
//! signatures when it has a secret, and answers 200 unless scripted (`respond_with(status,
//! times)`, `redirect_to(location, times)`, `delay_next(delay, times)`, `script(reply, times)`).

#![allow(dead_code, unused_imports)]

pub use shoal::dev::receiver::{Received, Receiver, Reply};
