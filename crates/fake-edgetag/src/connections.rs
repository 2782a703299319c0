//! Killable connections.
//!
//! hyper offers no way for a handler to abort its connection, and an erroring response body still
//! lets the status line and headers out first. So every accepted socket is wrapped in a stream with
//! a kill switch, handed to handlers as connect info: once killed, its reads and writes fail, hyper
//! drops the socket, and the client sees the connection close before any response byte. Dropping
//! the fake kills every open connection the same way.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::connect_info::Connected,
    serve::{IncomingStream, Listener},
};
use futures::task::AtomicWaker;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};

use crate::state::lock;

/// A per-connection switch that makes the connection's I/O fail.
#[derive(Default)]
struct KillSwitch {
    killed: AtomicBool,
    /// The connection task, woken so an idle connection notices promptly.
    waker: AtomicWaker,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Registers the polling task, then fails if the connection has been killed.
    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection dropped by the fake EdgeTag",
            ))
        } else {
            Ok(())
        }
    }
}

/// Connect info giving a handler the kill switch of its own connection.
#[derive(Clone)]
pub(crate) struct ConnHandle(Arc<KillSwitch>);

impl ConnHandle {
    pub(crate) fn kill(&self) {
        self.0.kill();
    }
}

impl Connected<IncomingStream<'_, KillableListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        ConnHandle(stream.io().switch.clone())
    }
}

/// The kill switches of live connections, so shutdown can close them all.
#[derive(Default)]
pub(crate) struct Connections {
    /// Guarded together with the list so a connection accepted during shutdown is not missed.
    live: Mutex<(bool, Vec<Weak<KillSwitch>>)>,
}

impl Connections {
    fn register(&self) -> Arc<KillSwitch> {
        let switch = Arc::new(KillSwitch::default());
        let mut live = lock(&self.live);
        let (shut_down, list) = &mut *live;
        if *shut_down {
            switch.kill();
        }
        // Prune closed connections whenever the list is full: amortised O(1) per connection.
        if list.len() == list.capacity() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(&switch));
        switch
    }

    pub(crate) fn kill_all(&self) {
        let mut live = lock(&self.live);
        live.0 = true;
        for switch in live.1.drain(..).filter_map(|w| w.upgrade()) {
            switch.kill();
        }
    }
}

pub(crate) struct KillableListener {
    pub(crate) inner: TcpListener,
    pub(crate) connections: Arc<Connections>,
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let switch = self.connections.register();
                    return (
                        KillableStream {
                            inner: stream,
                            switch,
                        },
                        addr,
                    );
                }
                // The peer gave up before we accepted; nothing to do.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                // Typically EMFILE under a huge burst: back off instead of spinning.
                Err(e) => {
                    tracing::error!(error = %e, "fake EdgeTag: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

pub(crate) struct KillableStream {
    inner: TcpStream,
    switch: Arc<KillSwitch>,
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
