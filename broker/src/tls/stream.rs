//! TLS over a device's TCP connection, holding buffers only while bytes are in flight.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB read buffer for the life of the
//! connection: the largest part of an idle session (BENCHMARKS.md, issue 11). This
//! stream drives rustls's unbuffered connection and owns the buffers itself: the
//! ciphertext read buffer exists while a record is incomplete, the plaintext one while
//! the session has not taken it, the write buffer while ciphertext waits for the
//! socket. An idle session holds none of them.
//!
//! The handshake is split in two so the listener can bound the expensive part: reading
//! the ClientHello costs nothing and waits for a slow client; the rest (key exchange and
//! signatures) runs once the listener grants a handshake slot.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::{ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How much is read from the socket at once.
const READ_SIZE: usize = 4096;
/// The most ciphertext held for one incomplete message: rustls's bound on a handshake
/// message (64 KiB) plus a record header; an application record is at most 16 KiB.
const MAX_INCOMING: usize = 0x1_0000 + 5;
/// Ciphertext queued for a slow reader before `poll_write` waits for the socket.
const MAX_OUTGOING: usize = 64 * 1024;
/// Write-buffer capacity kept once everything is sent; a larger buffer is given back.
const OUTGOING_KEPT: usize = 512;
/// TLS record overhead per 16 KiB fragment, rounded up: header, content type, AEAD tag.
const RECORD_OVERHEAD: usize = 64;
const MAX_FRAGMENT: usize = 16 * 1024;
/// The content type of a TLS handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

/// A server-side TLS stream (TLS 1.2 or 1.3) over a socket, TCP in the listeners.
pub struct TlsStream<S = TcpStream> {
    socket: S,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed: `incoming[..used]`.
    incoming: Vec<u8>,
    used: usize,
    /// Plaintext decrypted and not yet read: `plain[taken..]`.
    plain: Vec<u8>,
    taken: usize,
    /// Ciphertext to send: `outgoing[sent..]`.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer sent close_notify, or closed the socket.
    peer_closed: bool,
    /// Shutting down: close_notify is to be sent, then it was.
    closing: bool,
    close_sent: bool,
}

impl<S> TlsStream<S> {
    /// The same stream over another socket: the TCP connection moved to another runtime
    /// (`into_std`, then `from_std` there), say.
    pub fn map_socket<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<TlsStream<T>> {
        Ok(TlsStream {
            socket: f(self.socket)?,
            conn: self.conn,
            incoming: self.incoming,
            used: self.used,
            plain: self.plain,
            taken: self.taken,
            outgoing: self.outgoing,
            sent: self.sent,
            peer_closed: self.peer_closed,
            closing: self.closing,
            close_sent: self.close_sent,
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Starts a server connection on `socket`; nothing is read or sent yet.
    pub fn new(socket: S, config: Arc<ServerConfig>) -> io::Result<TlsStream<S>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Ok(TlsStream {
            socket,
            conn,
            incoming: Vec::new(),
            used: 0,
            plain: Vec::new(),
            taken: 0,
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            closing: false,
            close_sent: false,
        })
    }

    /// Reads until the client's first TLS record (its ClientHello) is complete, without
    /// processing it: the cheap part of a handshake, which a slow client can stretch.
    pub async fn read_client_hello(&mut self) -> io::Result<()> {
        loop {
            if let [kind, _, _, high, low, ..] = self.incoming[..self.used] {
                let len = usize::from(u16::from_be_bytes([high, low]));
                // Not a handshake record, or larger than a record may be: rustls refuses it.
                if kind != HANDSHAKE_RECORD || len > MAX_FRAGMENT || self.used >= 5 + len {
                    return Ok(());
                }
            }
            if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Completes the handshake: the key exchange, the signatures, the client's
    /// certificate if it sends one.
    pub async fn handshake(&mut self) -> io::Result<()> {
        loop {
            let established = match self.process(None) {
                Ok(established) => established,
                Err(e) => {
                    // rustls queued an alert saying why: the client learns it if it can.
                    self.encode_alert();
                    let _ = poll_fn(|cx| self.poll_send(cx)).await;
                    return Err(e);
                }
            };
            // In TLS 1.3 all that is left once established is session tickets: they go out
            // with the session's first read or write, and a client busy writing is not made
            // to read them first. In TLS 1.2 the client waits for the server's Finished.
            if established && self.conn.protocol_version() != Some(ProtocolVersion::TLSv1_2) {
                if let Poll::Ready(Err(e)) = poll_fn(|cx| Poll::Ready(self.poll_send(cx))).await {
                    return Err(e);
                }
                return Ok(());
            }
            poll_fn(|cx| self.poll_send(cx)).await?;
            if established {
                return Ok(());
            }
            if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The certificate chain the client presented, leaf first (empty if none).
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        self.conn.peer_certificates().unwrap_or_default()
    }

    /// Runs rustls over the ciphertext read so far: decrypted data goes to `plain`,
    /// anything rustls wants to send to `outgoing`, then `app_data` (if any) is
    /// encrypted. True once the handshake is complete.
    fn process(&mut self, mut app_data: Option<&[u8]>) -> io::Result<bool> {
        loop {
            let status = self
                .conn
                .process_tls_records(&mut self.incoming[..self.used]);
            let discard = status.discard;
            let mut established = None;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    // rustls's contract: what it consumed is discarded before any
                    // further call, even after an error.
                    self.discard(discard);
                    return Err(tls_error(e));
                }
            };
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        self.plain
                            .extend_from_slice(record.map_err(tls_error)?.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_handshake(&mut self.outgoing, &mut encode)?
                }
                // Sent in order by `poll_send`, before anything encrypted after it.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::BlockedHandshake => established = Some(false),
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(data) = app_data.take() {
                        for fragment in data.chunks(MAX_FRAGMENT) {
                            encrypt(&mut self.outgoing, fragment.len(), |room| {
                                traffic.encrypt(fragment, room)
                            })?;
                        }
                    }
                    if self.closing && !self.close_sent {
                        encrypt(&mut self.outgoing, 0, |room| {
                            traffic.queue_close_notify(room)
                        })?;
                        self.close_sent = true;
                    }
                    established = Some(true);
                }
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    established = Some(true);
                }
                // Early data is not enabled; a state rustls adds later is not handled.
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            }
            self.discard(discard);
            if let Some(established) = established {
                if app_data.is_some() {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                return Ok(established);
            }
        }
    }

    /// Drops the first `count` bytes of ciphertext, which rustls has consumed.
    fn discard(&mut self, count: usize) {
        if count > 0 {
            self.incoming.copy_within(count..self.used, 0);
            self.used -= count;
        }
    }

    /// After a failed handshake: encodes the alert rustls queued, and nothing more. One
    /// call: rustls hands out what it queued before it deframes anything, and what the
    /// client sent after the failure must not be deframed (a second failure would be a
    /// second fatal alert; and the buffer may hold the rest of a flight).
    fn encode_alert(&mut self) {
        let status = self
            .conn
            .process_tls_records(&mut self.incoming[..self.used]);
        let discard = status.discard;
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let _ = encode_handshake(&mut self.outgoing, &mut encode);
        }
        self.discard(discard);
    }

    /// Reads more ciphertext from the socket; Ready(0) at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.used >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message larger than 64 KiB",
            )));
        }
        let want = (self.used + READ_SIZE).min(MAX_INCOMING);
        if self.incoming.len() < want {
            self.incoming.resize(want, 0);
        }
        let mut room = ReadBuf::new(&mut self.incoming[self.used..]);
        match Pin::new(&mut self.socket).poll_read(cx, &mut room) {
            Poll::Ready(Ok(())) => {
                let read = room.filled().len();
                self.used += read;
                Poll::Ready(Ok(read))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Waiting for the peer: an idle connection keeps no read buffer.
                if self.used == 0 {
                    self.incoming = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    /// Writes the queued ciphertext to the socket.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let written =
                ready!(Pin::new(&mut self.socket).poll_write(cx, &self.outgoing[self.sent..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        self.sent = 0;
        if self.outgoing.capacity() > OUTGOING_KEPT {
            self.outgoing = Vec::new();
        } else {
            self.outgoing.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.taken);
                buf.put_slice(&this.plain[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plain.len() {
                    this.plain = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            this.process(None)?;
            // What rustls queued in answer (an alert, a key update) goes out now.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if this.taken < this.plain.len() || this.peer_closed {
                continue;
            }
            if ready!(this.poll_fill(cx))? == 0 {
                // The socket ended without close_notify: the end of the stream all the same,
                // but not inside a record.
                this.peer_closed = true;
                if this.used > 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a TLS record",
                    )));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() - this.sent >= MAX_OUTGOING {
            ready!(this.poll_send(cx))?;
        }
        this.process(Some(data))?;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            this.process(None)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.socket).poll_shutdown(cx)
    }
}

/// Encrypts into `outgoing` with `write`, growing it as rustls asks.
fn encrypt(
    outgoing: &mut Vec<u8>,
    len: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    grow_into(outgoing, len + RECORD_OVERHEAD, |room| match write(room) {
        Err(EncryptError::InsufficientSize(size)) => Err(Ok(size.required_size)),
        other => other.map_err(|e| Err(e.to_string())),
    })
}

/// Appends to `buf` what `write` writes into the room it is given: `Err(Ok(n))` asks for
/// `n` bytes of room, `Err(Err(reason))` fails.
/// Appends a handshake record (or alert) rustls has ready to `outgoing`.
fn encode_handshake<Data>(
    outgoing: &mut Vec<u8>,
    encode: &mut rustls::unbuffered::EncodeTlsData<'_, Data>,
) -> io::Result<()> {
    grow_into(outgoing, READ_SIZE, |room| match encode.encode(room) {
        Err(EncodeError::InsufficientSize(size)) => Err(Ok(size.required_size)),
        other => other.map_err(|e| Err(e.to_string())),
    })
}

fn grow_into(
    buf: &mut Vec<u8>,
    mut want: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Result<usize, String>>,
) -> io::Result<()> {
    loop {
        let start = buf.len();
        buf.resize(start + want, 0);
        let outcome = write(&mut buf[start..]);
        match outcome {
            Ok(written) => {
                buf.truncate(start + written);
                return Ok(());
            }
            Err(Ok(needed)) if needed > want => {
                buf.truncate(start);
                want = needed;
            }
            Err(Ok(_)) => {
                buf.truncate(start);
                return Err(io::Error::other(
                    "TLS record does not fit the room rustls asked for",
                ));
            }
            Err(Err(reason)) => {
                buf.truncate(start);
                return Err(io::Error::other(reason));
            }
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    struct Pki {
        server: Arc<ServerConfig>,
        ca: CertificateDer<'static>,
        _dir: tempfile::TempDir,
    }

    /// The development certificate, made once for the whole test binary.
    fn pki() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let paths = crate::devcert::ensure(dir.path()).unwrap();
            Pki {
                server: crate::tls::server_config(&paths.cert, &paths.key).unwrap(),
                ca: crate::tls::read_certificates(&paths.ca).unwrap().remove(0),
                _dir: dir,
            }
        })
    }

    fn client(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(pki().ca.clone()).unwrap();
        let config = ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A connected pair over a pipe that moves at most `chunk` bytes at a time, so records
    /// arrive in pieces.
    async fn pair(
        chunk: usize,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (
        TlsStream<DuplexStream>,
        tokio_rustls::client::TlsStream<DuplexStream>,
    ) {
        let (server_end, client_end) = tokio::io::duplex(chunk);
        let connector = client(versions);
        let name = ServerName::try_from("localhost").unwrap();
        let client = tokio::spawn(async move { connector.connect(name, client_end).await });
        let mut server = TlsStream::new(server_end, pki().server.clone()).unwrap();
        server.read_client_hello().await.unwrap();
        server.handshake().await.unwrap();
        (server, client.await.unwrap().unwrap())
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn data_crosses_both_ways_whatever_the_pieces() {
        for (chunk, version) in [
            (7, &rustls::version::TLS13),
            (64 * 1024, &rustls::version::TLS13),
            (5, &rustls::version::TLS12),
        ] {
            let (mut server, mut client) = pair(chunk, &[version]).await;
            let sent = payload(100_000);
            let to_server = sent.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&to_server).await.unwrap();
                client.flush().await.unwrap();
                let mut back = vec![0; 100_000];
                client.read_exact(&mut back).await.unwrap();
                back
            });
            let mut got = vec![0; sent.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(
                got == sent,
                "server read what the client wrote ({chunk}-byte pieces)"
            );
            server.write_all(&got).await.unwrap();
            server.flush().await.unwrap();
            assert!(writer.await.unwrap() == sent, "client read it back");
        }
    }

    #[tokio::test]
    async fn a_client_that_offers_resumption_gets_a_full_handshake_every_time() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            // One client configuration, so its session cache (on by default) would
            // resume the second connection if the server had given it a ticket or id.
            let connector = client(&[version]);
            for attempt in 0..2 {
                let (server_end, client_end) = tokio::io::duplex(64 * 1024);
                let name = ServerName::try_from("localhost").unwrap();
                let connector = connector.clone();
                let client = tokio::spawn(async move { connector.connect(name, client_end).await });
                let mut server = TlsStream::new(server_end, pki().server.clone()).unwrap();
                server.read_client_hello().await.unwrap();
                server.handshake().await.unwrap();
                let mut client = client.await.unwrap().unwrap();
                // Traffic both ways: TLS 1.3 tickets would have gone with it.
                server.write_all(b"hello").await.unwrap();
                server.flush().await.unwrap();
                let mut got = [0u8; 5];
                client.read_exact(&mut got).await.unwrap();
                client.write_all(b"bye").await.unwrap();
                client.flush().await.unwrap();
                server.read_exact(&mut [0u8; 3]).await.unwrap();
                assert_eq!(
                    client.get_ref().1.handshake_kind(),
                    Some(rustls::HandshakeKind::Full),
                    "{version:?} connection {attempt} was resumed"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffers() {
        let (mut server, mut client) = pair(64 * 1024, &[&rustls::version::TLS13]).await;
        client.write_all(&payload(20_000)).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; 20_000];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(&payload(20_000)).await.unwrap();
        server.flush().await.unwrap();
        let mut back = vec![0; 20_000];
        client.read_exact(&mut back).await.unwrap();
        // Nothing more to read: the read waits, and gives its buffers back.
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), server.read(&mut [0u8; 16])).await;
        assert!(waiting.is_err(), "nothing was sent, so the read waits");
        assert_eq!(server.incoming.capacity(), 0, "read buffer given back");
        assert_eq!(server.plain.capacity(), 0, "plaintext buffer given back");
        assert!(
            server.outgoing.capacity() <= OUTGOING_KEPT,
            "write buffer given back"
        );
        // And the connection still works.
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut ping = [0u8; 4];
        server.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_both_ways() {
        let (mut server, mut client) = pair(1024, &[&rustls::version::TLS13]).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        // The client's read fails with UnexpectedEof if close_notify did not come.
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");

        let (mut server, mut client) = pair(1024, &[&rustls::version::TLS13]).await;
        client.write_all(b"done").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"done");
    }

    #[tokio::test]
    async fn a_socket_closed_inside_a_record_is_an_error() {
        let (mut server, client) = pair(1024, &[&rustls::version::TLS13]).await;
        let (mut raw, _) = client.into_inner();
        // A record header announcing 100 bytes, then only 3 of them.
        raw.write_all(&[0x17, 0x03, 0x03, 0x00, 0x64, 1, 2, 3])
            .await
            .unwrap();
        drop(raw);
        let error = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_fails_cleanly() {
        // Not TLS at all: an MQTT CONNECT sent in clear text.
        let (server_end, mut client_end) = tokio::io::duplex(4096);
        let mut server = TlsStream::new(server_end, pki().server.clone()).unwrap();
        client_end
            .write_all(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0])
            .await
            .unwrap();
        let outcome = async {
            server.read_client_hello().await?;
            server.handshake().await
        };
        let error = outcome.await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");

        // A record header claiming more than a handshake may hold, then silence.
        let (server_end, mut client_end) = tokio::io::duplex(1 << 20);
        let mut server = TlsStream::new(server_end, pki().server.clone()).unwrap();
        let mut flood = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        flood.extend(std::iter::repeat_n(0u8, MAX_INCOMING + 10));
        client_end.write_all(&flood).await.unwrap();
        let outcome = async {
            server.read_client_hello().await?;
            server.handshake().await
        };
        assert!(outcome.await.is_err(), "an oversized record is refused");
    }

    #[tokio::test]
    async fn a_client_refusing_the_server_ends_the_handshake_with_its_reason() {
        // A client that trusts nothing the server has: it refuses, and says why.
        let (server_end, client_end) = tokio::io::duplex(4096);
        let config = ClientConfig::builder()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from("localhost").unwrap();
        let client = tokio::spawn(async move { connector.connect(name, client_end).await });
        let mut server = TlsStream::new(server_end, pki().server.clone()).unwrap();
        server.read_client_hello().await.unwrap();
        let error = server.handshake().await.unwrap_err();
        assert!(error.to_string().contains("UnknownCA"), "{error}");
        assert!(client.await.unwrap().is_err());
    }

    /// A client CA (written into the directory), and a client certificate from another CA
    /// of the same name, with its key.
    fn untrusted_client() -> (
        tempfile::TempDir,
        CertificateDer<'static>,
        rustls::pki_types::PrivatePkcs8KeyDer<'static>,
    ) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, Issuer::new(params, key))
        };
        let (trusted, _) = ca("operators");
        let (_, rogue) = ca("operators");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "ops");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, &rogue).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client-ca.pem"), trusted.pem()).unwrap();
        (dir, leaf.der().clone(), key.serialize_der().into())
    }

    #[tokio::test]
    async fn a_client_certificate_the_server_refuses_ends_the_handshake_without_a_panic() {
        // The refusal comes while the client's Certificate, CertificateVerify and
        // Finished wait in one buffer: the alert is sent and nothing more is deframed
        // (it once was, over an emptied buffer, and rustls panicked).
        let (dir, leaf, key) = untrusted_client();
        let paths = crate::devcert::ensure(dir.path()).unwrap();
        let server = crate::tls::operator_server_config(
            &paths.cert,
            &paths.key,
            Some(&dir.path().join("client-ca.pem")),
        )
        .unwrap();
        for (chunk, version) in [
            (64 * 1024, &rustls::version::TLS13),
            (7, &rustls::version::TLS13),
            (64 * 1024, &rustls::version::TLS12),
        ] {
            let mut roots = RootCertStore::empty();
            for ca in crate::tls::read_certificates(&paths.ca).unwrap() {
                roots.add(ca).unwrap();
            }
            let config = ClientConfig::builder_with_protocol_versions(&[version])
                .with_root_certificates(roots)
                .with_client_auth_cert(vec![leaf.clone()], key.clone_key().into())
                .unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let (server_end, client_end) = tokio::io::duplex(chunk);
            let name = ServerName::try_from("localhost").unwrap();
            let client = tokio::spawn(async move {
                let mut stream = connector.connect(name, client_end).await?;
                // TLS 1.3: the client learns of the refusal on its first read.
                let mut byte = [0u8; 1];
                stream.read(&mut byte).await
            });
            let mut stream = TlsStream::new(server_end, server.clone()).unwrap();
            stream.read_client_hello().await.unwrap();
            let error = tokio::spawn(async move { stream.handshake().await })
                .await
                .expect("the handshake does not panic")
                .unwrap_err();
            assert!(
                error.to_string().contains("invalid peer certificate"),
                "{version:?}: {error}"
            );
            assert!(client.await.unwrap().is_err(), "{version:?}");
        }
    }
}
