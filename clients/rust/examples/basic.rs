//! Sets, reads and deletes a key, then runs 1000 reads from 50 tasks at once
//! (pipelined on the client's streams).
//!
//! ```sh
//! scripts/run-local.sh            # a local cluster on localhost:50051
//! cargo run -p ringcache-client --example basic -- http://localhost:50051
//! ```

use std::time::{Duration, Instant};

use ringcache_client::{Client, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let uri = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://localhost:50051".to_owned());
    let client = Client::builder(uri)
        .timeout(Duration::from_millis(500))
        .connect()
        .await?;

    let version = client.set("greeting", "hello").await?;
    println!("set greeting (version {version})");
    if let Some(entry) = client.get("greeting").await? {
        println!(
            "get greeting: {} (version {})",
            String::from_utf8_lossy(&entry.value),
            entry.version
        );
    }

    // Concurrent calls share the client's pipelines: clone the handle.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                client.get("greeting").await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| Error::Config(e.to_string()))??;
    }
    println!("1000 concurrent reads in {:?}", started.elapsed());

    println!("deleted: {}", client.delete("greeting").await?);
    Ok(())
}
