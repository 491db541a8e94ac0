//! A TCP fault proxy: copies bytes between its clients and one backend
//! until told to cut — then it closes every connection it carries and
//! refuses new ones until restored. It stands for a network partition
//! between one process and another (a feed dropped, a node unreachable
//! from one orchestrator only) without touching the kernel's routing. It
//! can also delay what clients send (latency on one direction of one
//! path), to force races between calls on different paths.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A proxy to one backend; see the module documentation.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Incremented by `cut`: connections of an older generation close.
    generation: Arc<tokio::sync::watch::Sender<usize>>,
    connections: Arc<AtomicUsize>,
    /// Milliseconds each chunk a client sends waits before it is passed on.
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on an ephemeral port of 127.0.0.1 to `backend`.
    pub async fn start(backend: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(tokio::sync::watch::channel(0usize).0);
        let connections = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (cut, generation, connections, delay_ms) = (
                cut.clone(),
                generation.clone(),
                connections.clone(),
                delay_ms.clone(),
            );
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        // Refused: closed at once.
                        continue;
                    }
                    connections.fetch_add(1, Ordering::SeqCst);
                    let mut cuts = generation.subscribe();
                    let delay_ms = delay_ms.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(backend).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        let upstream = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = match client_read.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                let delay = delay_ms.load(Ordering::Relaxed);
                                if delay > 0 {
                                    tokio::time::sleep(Duration::from_millis(delay)).await;
                                }
                                if server_write.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                        let downstream = tokio::io::copy(&mut server_read, &mut client_write);
                        tokio::select! {
                            _ = upstream => {}
                            _ = downstream => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            }
        });
        FaultProxy {
            addr,
            cut,
            generation,
            connections,
            delay_ms,
            task,
        }
    }

    /// Closes every connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Delays every chunk clients send by `delay` before passing it on
    /// (zero: no delay). Chunks stay in order.
    pub fn delay(&self, delay: Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
