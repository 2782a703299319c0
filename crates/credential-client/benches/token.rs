//! `token()` from memory versus a GetToken round trip on loopback, against the real service.
//!
//! `cargo bench -p credential-client --bench token`

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use credential_service::proto::GetTokenRequest;

/// Mean, median and 99th percentile of `samples`.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    format!("mean {mean:?}, p50 {:?}, p99 {:?}", at(0.5), at(0.99))
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let service = common::Service::spawn().await;
        service.connect("acme").await;
        let source = common::client(service.addr, &service.clock)
            .build()
            .unwrap()
            .token_source("acme");
        source.token().await.unwrap();

        // token(): batches of 1,000 calls, each batch timed as one sample.
        const BATCH: u32 = 1_000;
        let mut samples = Vec::new();
        for _ in 0..1_000 {
            let start = Instant::now();
            for _ in 0..BATCH {
                black_box(source.token().await.unwrap());
            }
            samples.push(start.elapsed() / BATCH);
        }
        println!("token() from memory:        {}", summary(samples));

        // GetToken: one call per sample, after a warm-up on the same connection.
        let mut grpc = service.grpc.clone();
        let request = || GetTokenRequest {
            account: "acme".into(),
            min_validity: None,
        };
        for _ in 0..200 {
            grpc.get_token(request()).await.unwrap();
        }
        let mut samples = Vec::new();
        for _ in 0..5_000 {
            let start = Instant::now();
            black_box(grpc.get_token(request()).await.unwrap());
            samples.push(start.elapsed());
        }
        println!("GetToken round trip:        {}", summary(samples));
    });
}
