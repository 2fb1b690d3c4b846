//! Criterion benchmarks of statement classification: the keyword fast path
//! (what every pgbench statement takes) and the full-parse slow path.

use chorus_router::{classify, classify_query};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn bench_classify(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    group.bench_function("select_fast_path", |b| {
        b.iter(|| {
            classify(black_box(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            ))
        })
    });
    group.bench_function("update_fast_path", |b| {
        b.iter(|| {
            classify(black_box(
                "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            ))
        })
    });
    group.bench_function("writable_cte_parsed", |b| {
        b.iter(|| {
            classify(black_box(
                "WITH u AS (UPDATE t SET v = 1 WHERE id = 3 RETURNING id) SELECT count(*) FROM u",
            ))
        })
    });
    group.bench_function("pgbench_tpcb_transaction", |b| {
        b.iter(|| {
            classify_query(black_box(
                "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 10 WHERE aid = 7; \
                 SELECT abalance FROM pgbench_accounts WHERE aid = 7; \
                 UPDATE pgbench_tellers SET tbalance = tbalance + 10 WHERE tid = 3; \
                 UPDATE pgbench_branches SET bbalance = bbalance + 10 WHERE bid = 1; \
                 INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 7, 10, CURRENT_TIMESTAMP); END;",
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_classify);
criterion_main!(benches);
