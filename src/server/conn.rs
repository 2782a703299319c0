//! Accepting gRPC connections within bounds. At most `--max-connections` are open at once (one
//! more is closed as soon as it is accepted); each must finish its TLS handshake and send the
//! HTTP/2 preface within `--handshake-timeout` or it is closed, so silent peers cannot hold file
//! descriptors; accept errors (EMFILE when descriptors run out) back off instead of spinning.
//! TLS is done here rather than by tonic so that the deadline covers TLS and HTTP/2 together.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    config::Limits,
    metrics::{self, ConnectionGuard, Throttled},
    tls::ServerTls,
};

/// The HTTP/2 client preface (RFC 9113 §3.4): the handshake is done once it has arrived.
const PREFACE_LEN: usize = 24;

/// Connections handed to tonic: accepted, counted, and within their handshake deadline.
pub(super) type Incoming<IO> = ReceiverStream<io::Result<Conn<IO>>>;

pub(super) static REFUSED: Throttled = Throttled::new(
    "connections",
    "connection refused: too many open (--max-connections / CREDENTIAL_SERVICE_MAX_CONNECTIONS)",
);
pub(super) static TIMED_OUT: Throttled = Throttled::new(
    "handshake_timeout",
    "connection closed: no TLS handshake or HTTP/2 preface in time (--handshake-timeout / CREDENTIAL_SERVICE_HANDSHAKE_TIMEOUT)",
);

/// Plaintext connections from `listener`.
pub(super) fn plain(listener: TcpListener, limits: &Limits) -> Incoming<TcpStream> {
    accept(listener, limits, |tcp| async move { Ok(tcp) })
}

/// TLS connections from `listener`, each handshake in a task of its own, with the certificate
/// in force when it starts.
pub(super) fn tls(
    listener: TcpListener,
    limits: &Limits,
    tls: ServerTls,
) -> Incoming<TlsStream<TcpStream>> {
    accept(listener, limits, move |tcp| {
        let acceptor = tls.acceptor();
        async move { acceptor.accept(tcp).await }
    })
}

/// Runs the accept loop in a task; it ends, closing the listener, when tonic drops the stream.
fn accept<IO, F, Fut>(listener: TcpListener, limits: &Limits, handshake: F) -> Incoming<IO>
where
    IO: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let timeout = limits.handshake_timeout;
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let tcp = match accepted {
                Ok((tcp, _peer)) => {
                    backoff.reset();
                    tcp
                }
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    backoff.wait(&e).await;
                    continue;
                }
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                REFUSED.hit();
                continue; // dropping it closes it
            };
            let _ = tcp.set_nodelay(true);
            let deadline = Instant::now() + timeout;
            let (shake, tx) = (handshake(tcp), tx.clone());
            tokio::spawn(async move {
                let guard = metrics::grpc_connection();
                match tokio::time::timeout_at(deadline, shake).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(Conn::new(io, deadline, permit, guard))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => TIMED_OUT.hit(),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Errors that concern one connection only (the peer gave up); the next accept is fine.
pub(super) fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Backs off on accept errors (out of file descriptors, memory): 10 ms, doubling up to 1 s;
/// one warning when a burst starts and one line when accepting works again. The HTTP
/// listeners' accept loops use it too.
#[derive(Default)]
pub(super) struct Backoff {
    errors: u64,
    delay: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub(super) async fn wait(&mut self, e: &io::Error) {
        metrics::record_limit_hit("accept_errors");
        if self.errors == 0 {
            tracing::warn!(error = %e, "cannot accept connections; backing off until it works again");
            self.delay = Self::FIRST;
        }
        self.errors += 1;
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    pub(super) fn reset(&mut self) {
        if self.errors > 0 {
            tracing::info!(
                errors = self.errors,
                "accepting connections again after accept errors"
            );
            self.errors = 0;
        }
    }
}

/// An accepted connection: holds its place among `--max-connections` and, until the HTTP/2
/// preface has been read, fails its reads once the handshake deadline has passed, which makes
/// hyper close it.
pub(super) struct Conn<IO> {
    io: IO,
    /// `None` once the preface is in.
    deadline: Option<Pin<Box<Sleep>>>,
    preface_read: usize,
    _permit: OwnedSemaphorePermit,
    _open: ConnectionGuard,
}

impl<IO> Conn<IO> {
    fn new(io: IO, deadline: Instant, permit: OwnedSemaphorePermit, open: ConnectionGuard) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            preface_read: 0,
            _permit: permit,
            _open: open,
        }
    }
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(deadline) = &mut this.deadline else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        if deadline.as_mut().poll(cx).is_ready() {
            if this.preface_read != usize::MAX {
                this.preface_read = usize::MAX; // counted once
                TIMED_OUT.hit();
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within the handshake timeout",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.preface_read += buf.filled().len() - before;
            if this.preface_read >= PREFACE_LEN {
                this.deadline = None;
            }
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
