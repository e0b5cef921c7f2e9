//! What a fleet shares: a Redis server (or Valkey, or anything that speaks
//! its protocol) that several gracesrv hosts use for ACME state and TLS
//! ticket keys (`acme.storage: redis://...`, `tls_tickets.storage`).
//!
//! The store is never on the serving path. Each host keeps a copy of what
//! it serves (certificates in `acme.cache`, ticket keys in memory and handed
//! to its next generation), so with the store down every host goes on
//! serving, restarts included; it says so once a minute at most, and
//! catches up when the store is back.
//!
//! Every key is under `gracesrv:`; a database number in the URL separates
//! services that share one server.

pub(crate) mod lease;
pub(crate) mod seal;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, RedisError};
use tracing::{info, warn};

use crate::config::StoreConfig;
use crate::observe::logging::Chain;

/// How long connecting, or one command, may take before the store counts
/// as unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);
/// At most one line per this while the store is unreachable.
const OUTAGE_LOG: Duration = Duration::from_secs(60);
/// The prefix of every key and channel.
const PREFIX: &str = "gracesrv:";

/// Why the store did not answer, or answered something unusable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("{store}: {source}")]
    Redis {
        store: String,
        #[source]
        source: RedisError,
    },
    #[error("{store}: {key}: {why}")]
    Value {
        store: String,
        key: String,
        why: seal::SealError,
    },
}

/// Why a store cannot be set up (a config file that cannot be read).
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("{key}: cannot read {file}: {source}")]
    File {
        key: String,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {file}: {source}")]
    Seal {
        key: String,
        file: String,
        #[source]
        source: seal::SealError,
    },
    #[error("{store}: {source}")]
    Client {
        store: String,
        #[source]
        source: RedisError,
    },
}

/// One store: a client, its connection (made when first needed, made again
/// after a failure), how values are sealed, and whether it is reachable.
pub(crate) struct Store {
    source: Source,
    shown: String,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    seal: seal::Sealing,
    reach: Mutex<Reach>,
    /// Told when the store stops answering (a subscription on a
    /// connection that went silent then starts again).
    lost: tokio::sync::Notify,
}

/// Where the server is: a URL, or what Sentinels say is the master now.
enum Source {
    Direct(redis::Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

/// Whether the store answers: since when it has (without a failure), or
/// since when it has not, and when that was last said.
#[derive(Default)]
struct Reach {
    up_since: Option<Instant>,
    outage: Option<Outage>,
    /// When a value this host cannot use was last said.
    refused: Option<Instant>,
}

struct Outage {
    since: Instant,
    said: Instant,
}

fn read(f: &crate::config::FileRef) -> Result<Vec<u8>, OpenError> {
    std::fs::read(&f.path).map_err(|source| OpenError::File {
        key: f.key.clone(),
        file: f.written.clone(),
        source,
    })
}

impl Store {
    /// The store `config` names. Reads `storage_ca` and `storage_key_file`
    /// (small files, at a generation's start); connects later.
    pub(crate) fn open(config: &StoreConfig) -> Result<Arc<Store>, OpenError> {
        let seal = match &config.key_file {
            Some(f) => seal::Sealing::new(Some(seal::Sealer::from_key_file(&read(f)?).map_err(
                |source| OpenError::Seal {
                    key: f.key.clone(),
                    file: f.written.clone(),
                    source,
                },
            )?)),
            None => seal::Sealing::new(None),
        };
        let client_error = |source| OpenError::Client {
            store: config.shown.clone(),
            source,
        };
        let source = match (&config.sentinel, &config.ca) {
            (Some(s), _) => {
                let mut node = redis::RedisConnectionInfo::default().set_db(s.db);
                if let Some(u) = &s.user {
                    node = node.set_username(u);
                }
                if let Some(p) = &s.password {
                    node = node.set_password(p);
                }
                Source::Sentinel(tokio::sync::Mutex::new(
                    redis::sentinel::SentinelClient::build(
                        s.sentinels.clone(),
                        s.service.as_str(),
                        Some(
                            redis::sentinel::SentinelNodeConnectionInfo::default()
                                .set_redis_connection_info(node),
                        ),
                        redis::sentinel::SentinelServerType::Master,
                    )
                    .map_err(client_error)?,
                ))
            }
            (None, Some(ca)) => Source::Direct(
                redis::Client::build_with_tls(
                    config.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(read(ca)?),
                    },
                )
                .map_err(client_error)?,
            ),
            (None, None) => {
                Source::Direct(redis::Client::open(config.url.as_str()).map_err(client_error)?)
            }
        };
        Ok(Arc::new(Store {
            source,
            shown: config.shown.clone(),
            conn: tokio::sync::Mutex::new(None),
            seal,
            reach: Mutex::new(Reach::default()),
            lost: tokio::sync::Notify::new(),
        }))
    }

    /// Returns when the store stops answering a command.
    pub(crate) async fn lost(&self) {
        self.lost.notified().await
    }

    /// The URL, without its password.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// The full name of `key`.
    pub(crate) fn key(&self, key: &str) -> String {
        format!("{PREFIX}{key}")
    }

    /// A client for the server: the URL's, or the master's the Sentinels
    /// name now.
    async fn client(&self) -> Result<redis::Client, RedisError> {
        match &self.source {
            Source::Direct(c) => Ok(c.clone()),
            Source::Sentinel(s) => {
                let ask = async { s.lock().await.async_get_client().await };
                tokio::time::timeout(TIMEOUT, ask)
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
            }
        }
    }

    async fn conn(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let c = self
            .client()
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `cmd`; a failure to reach the store drops the connection (the
    /// next command connects again) and is logged once a minute at most.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let result = match self.conn().await {
            Ok(mut c) => cmd.query_async(&mut c).await,
            Err(e) => Err(e),
        };
        self.answered(result)
    }

    /// Runs a Lua script (`EVALSHA`, loading it when the server lacks it).
    pub(crate) async fn script<T: FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let result = match self.conn().await {
            Ok(mut c) => {
                let mut invocation = script.prepare_invoke();
                for k in keys {
                    invocation.key(*k);
                }
                for a in args {
                    invocation.arg(*a);
                }
                invocation.invoke_async(&mut c).await
            }
            Err(e) => Err(e),
        };
        self.answered(result)
    }

    /// Runs the commands of `pipe` in one round trip.
    pub(crate) async fn pipeline(&self, pipe: &redis::Pipeline) -> Result<(), StoreError> {
        let result = match self.conn().await {
            Ok(mut c) => pipe.query_async::<redis::Value>(&mut c).await.map(drop),
            Err(e) => Err(e),
        };
        self.answered(result)
    }

    fn answered<T>(&self, result: Result<T, RedisError>) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                self.reachable();
                Ok(v)
            }
            Err(e) => {
                let away = unreachable(&e);
                // A replica's READONLY: a master that was replaced; the
                // next connection asks the Sentinels again.
                if away || e.code() == Some("READONLY") {
                    if let Ok(mut slot) = self.conn.try_lock() {
                        *slot = None;
                    }
                }
                if away {
                    self.unreachable(&e);
                }
                Err(StoreError::Redis {
                    store: self.shown.clone(),
                    source: e,
                })
            }
        }
    }

    /// Notes that the store could not be reached: a line when that starts,
    /// and one a minute while it lasts.
    pub(crate) fn unreachable(&self, e: &RedisError) {
        let now = Instant::now();
        let mut reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        reach.up_since = None;
        match &mut reach.outage {
            Some(o) if now.duration_since(o.said) < OUTAGE_LOG => {}
            Some(o) => {
                o.said = now;
                warn!(store = %self.shown, "the store is still unreachable after {}s; serving what this host has: {e}", now.duration_since(o.since).as_secs(), e = Chain(e));
            }
            None => {
                reach.outage = Some(Outage {
                    since: now,
                    said: now,
                });
                self.lost.notify_waiters();
                warn!(store = %self.shown, "the store is unreachable; serving what this host has, and catching up when it is back: {e}", e = Chain(e));
            }
        }
    }

    fn reachable(&self) {
        let mut reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        reach.up_since.get_or_insert_with(Instant::now);
        if let Some(o) = reach.outage.take() {
            info!(store = %self.shown, "the store is reachable again after {}s", o.since.elapsed().as_secs());
        }
    }

    /// Says `e` if it is about a value this host cannot use (sealed with
    /// another key...) or a command the store refused (a replica's
    /// READONLY...), once a minute at most; an unreachable store was said
    /// already.
    pub(crate) fn complain(&self, what: &str, e: &StoreError) {
        let said_already = match e {
            StoreError::Value { .. } => false,
            // Reached, and refused (READONLY, NOAUTH...): not said yet.
            StoreError::Redis { source, .. } => unreachable(source),
        };
        if !said_already {
            let mut reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
            if reach.refused.is_none_or(|t| t.elapsed() >= OUTAGE_LOG) {
                reach.refused = Some(Instant::now());
                warn!("{what}: {e}", e = Chain(e));
            }
        }
    }

    /// For `status`: the store (no password), whether its last answer was
    /// good, and for how long it has not answered.
    pub(crate) fn json(&self) -> serde_json::Value {
        let reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "url": self.shown,
            "reachable": reach.up_since.is_some(),
            "unreachable_for_s": reach.outage.as_ref().map(|o| o.since.elapsed().as_secs()),
        })
    }

    /// How long the store has answered without a failure (zero if it
    /// does not).
    pub(crate) fn up_for(&self) -> Duration {
        let reach = self.reach.lock().unwrap_or_else(|p| p.into_inner());
        reach.up_since.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// The value of `key`, unsealed; `None` if there is none.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.key(key);
        let v: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&full)).await?;
        match v {
            Some(v) => self
                .seal
                .open(&full, &v)
                .map(Some)
                .map_err(|why| StoreError::Value {
                    store: self.shown.clone(),
                    key: full,
                    why,
                }),
            None => Ok(None),
        }
    }

    /// Sets `key` to `value` (sealed when the store has a key file), for
    /// `ttl` if given; with `only_new`, only if `key` has no value
    /// (`false` then).
    pub(crate) async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        only_new: bool,
    ) -> Result<bool, StoreError> {
        let full = self.key(key);
        let sealed = self.seal.seal(&full, value);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&full).arg(sealed);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        if only_new {
            cmd.arg("NX");
        }
        let done: Option<String> = self.query(&cmd).await?;
        Ok(done.is_some())
    }

    pub(crate) async fn del(&self, key: &str) -> Result<(), StoreError> {
        self.query::<i64>(redis::cmd("DEL").arg(self.key(key)))
            .await
            .map(drop)
    }

    /// Publishes `message` on `channel`: how many subscribers got it.
    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<usize, StoreError> {
        let n: i64 = self
            .query(redis::cmd("PUBLISH").arg(self.key(channel)).arg(message))
            .await?;
        Ok(n.max(0) as usize)
    }

    /// The keys under `pattern` (a `SCAN MATCH` glob, prefix added), with
    /// the prefix taken off.
    pub(crate) async fn keys(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(self.key(pattern))
                        .arg("COUNT")
                        .arg(100),
                )
                .await?;
            out.extend(
                batch
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(PREFIX).map(str::to_string)),
            );
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// A connection subscribed to `channel`: its messages, until the
    /// connection ends.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub, StoreError> {
        let connect = async {
            let mut pubsub = self.client().await?.get_async_pubsub().await?;
            pubsub.subscribe(self.key(channel)).await?;
            Ok(pubsub)
        };
        let result = tokio::time::timeout(TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        self.answered(result)
    }
}

/// Does `e` say the store could not be reached (rather than that it
/// refused a command)?
fn unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

/// Who this process is, in the store (a lease's holder, a challenge's
/// acknowledgement): host name and pid.
pub(crate) fn holder() -> &'static str {
    static HOLDER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOLDER.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        format!("{host}:{}", std::process::id())
    })
}
