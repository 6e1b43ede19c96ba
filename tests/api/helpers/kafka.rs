//! Kafka from the tests' side: a plain rdkafka consumer, broker metadata, and brokers of the
//! tests' own (for outages).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;

/// A record as the test reads it back.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub value: serde_json::Value,
    pub headers: HashMap<String, String>,
    pub partition: i32,
}

/// Reads `count` records of `topic` from the beginning (fails after `timeout`).
pub fn read_records(bootstrap: &str, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("consume");
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for i in 0..h.count() {
                    let hh = h.get(i);
                    headers.insert(
                        hh.key.to_owned(),
                        String::from_utf8_lossy(hh.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Record {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON value"),
                headers,
                partition: m.partition(),
            });
        }
    }
    assert_eq!(out.len(), count, "records read from {topic}");
    out
}

/// Partition count of `topic`, or None when the broker does not have it.
pub fn partitions(bootstrap: &str, topic: &str) -> Option<usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("metadata client");
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    md.topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
}

/// [`partitions`] off the async workers (it blocks on a metadata request).
#[allow(dead_code)]
pub async fn partitions_of(bootstrap: &str, topic: &str) -> Option<usize> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || partitions(&bootstrap, &topic))
        .await
        .unwrap()
}

/// A tansu broker of the test's own, on a free port, with memory storage.
pub struct OwnBroker {
    pub port: u16,
    /// The port it tells clients to use (a proxy's, see [`CreateRefusingBroker`]).
    advertised_port: u16,
    child: Option<Child>,
}

fn tansu_bin() -> String {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return bin;
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    for candidate in [
        format!("{home}/.cache/mod-pubsub/tansu-0.6.0/bin/tansu"),
        format!(
            "{}/.tools/tansu-0.6.0/bin/tansu",
            env!("CARGO_MANIFEST_DIR")
        ),
    ] {
        if std::path::Path::new(&candidate).exists() {
            return candidate;
        }
    }
    panic!("no tansu binary: run the tests through scripts/test.sh, which provides TANSU_BIN");
}

impl OwnBroker {
    pub fn start() -> OwnBroker {
        let port = free_port();
        Self::start_advertising(port, port)
    }

    fn start_advertising(port: u16, advertised_port: u16) -> OwnBroker {
        let mut b = OwnBroker {
            port,
            advertised_port,
            child: None,
        };
        b.restart();
        b
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id while it runs (the benches, which include this file, read its
    /// peak memory).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it (again) on the same port; memory storage starts empty.
    pub fn restart(&mut self) {
        self.stop();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker of the test's own behind a proxy that never forwards CreateTopics requests while
/// `refuse_creates` is set: topics that exist are used as ever, creating one never succeeds (the
/// client times out). It stands in for a cluster where topic creation is not allowed (tansu has
/// no ACLs to refuse it with). Clients connect to `port`, which the broker advertises.
#[allow(dead_code)]
pub struct CreateRefusingBroker {
    pub port: u16,
    pub refuse_creates: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _broker: OwnBroker,
    proxy: tokio::task::JoinHandle<()>,
}

#[allow(dead_code)]
impl CreateRefusingBroker {
    /// Starts it (inside a tokio runtime), creating topics normally until `refuse_creates` is set.
    pub async fn start() -> CreateRefusingBroker {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const CREATE_TOPICS: i16 = 19;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let broker = OwnBroker::start_advertising(free_port(), port);
        let upstream = broker.port;
        let refuse = std::sync::Arc::new(AtomicBool::new(false));
        let refuse_creates = refuse.clone();
        let proxy = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let refuse = refuse.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    // Requests are length-prefixed frames whose body starts with the API key.
                    let requests = async move {
                        loop {
                            let mut len = [0u8; 4];
                            client_rx.read_exact(&mut len).await?;
                            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                            client_rx.read_exact(&mut body).await?;
                            let api_key = i16::from_be_bytes([body[0], body[1]]);
                            if api_key == CREATE_TOPICS && refuse.load(Ordering::SeqCst) {
                                continue;
                            }
                            server_tx.write_all(&len).await?;
                            server_tx.write_all(&body).await?;
                        }
                        #[allow(unreachable_code)]
                        Ok::<(), std::io::Error>(())
                    };
                    let responses = tokio::io::copy(&mut server_rx, &mut client_tx);
                    let _ = tokio::join!(requests, responses);
                });
            }
        });
        CreateRefusingBroker {
            port,
            refuse_creates,
            _broker: broker,
            proxy,
        }
    }
}

impl Drop for CreateRefusingBroker {
    fn drop(&mut self) {
        self.proxy.abort();
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
