//! Peer identity and the peers' end-to-end channel (issue 14, "Punch without trusting the
//! server").
//!
//! - **Identity.** Every punch peer has an Ed25519 key pair ([`Identity`]); its public half
//!   ([`PeerKey`], printed as 64 hex digits) is what a user pins with `punch connect --peer-key`.
//!   REGISTER and UNREGISTER carry the key and an Ed25519 signature over the transaction id and the
//!   id ([`Identity::prove`], [`verify`]), so the server can check possession, and an id held by
//!   one key cannot be taken by another while it is registered ([`may_hold`]).
//! - **Channel.** The two peers of a session run a Noise handshake, pattern **IK**
//!   (`Noise_IK_25519_ChaChaPoly_BLAKE2s`, through the `snow` crate): the connector knows the
//!   listener's static key before the first message (from `--peer-key`, or else from the server),
//!   so one round trip authenticates both sides and sends the connector's own key encrypted. The
//!   Noise static key is the X25519 form of the same Ed25519 key (the standard birational map,
//!   `to_scalar_bytes`/`to_montgomery`), so one key file is the whole identity.
//!   After the handshake every peer-to-peer message is sealed with the Noise transport keys in
//!   stateless mode (an explicit 64-bit nonce per message, since datagrams are lost and
//!   reordered), and a replay window drops any nonce seen before.
//!
//! Nothing here reads a clock or the OS's entropy: the ephemeral keys come from a generator the
//! caller seeds (snow's `Random` is given a `StdRng` through a resolver). The only hand-written
//! piece is the replay window (a sliding ring bitmap, as in RFC 6479 / IPsec): no crate offers
//! one for an explicit-nonce transport, and it is bookkeeping, not cryptography.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState, StatelessTransportState};

use crate::stun::TransactionId;

/// The Noise protocol the peers speak.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Bound into every handshake (Noise prologue) and every signature: a key proof or handshake of
/// another protocol (or version) is never one of ours.
const PROLOGUE: &[u8] = b"natscope-punch/1";
/// Bytes a sealed message adds: the nonce and the AEAD tag.
pub const SEAL_OVERHEAD: usize = 8 + 16;
/// Largest handshake message we send or accept (IK: 96 bytes then 48).
pub const MAX_HANDSHAKE: usize = 128;

/// A peer's public key (Ed25519), as `--peer-key` takes it and the listener prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey(pub [u8; 32]);

impl PeerKey {
    fn verifying(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }

    /// The X25519 public key Noise uses for this peer.
    fn noise_public(&self) -> Option<[u8; 32]> {
        self.verifying().map(|v| v.to_montgomery().to_bytes())
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({self})")
    }
}

/// Why a string is not a peer key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("a peer key is 64 hex digits (as `punch listen` prints it)")]
    Format,
    #[error("not a valid Ed25519 public key")]
    NotAPoint,
}

/// Decodes 64 hex digits into 32 bytes (hand-written: eight lines do not need a crate).
pub fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl FromStr for PeerKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_hex32(s).ok_or(KeyParseError::Format)?;
        let k = PeerKey(bytes);
        k.verifying().ok_or(KeyParseError::NotAPoint)?;
        Ok(k)
    }
}

/// What a key proof is for (bound into the signed bytes, so one cannot stand for the other).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Register,
    Unregister,
}

/// A key and its signature over a REGISTER or UNREGISTER (attributes PEER-KEY and SIGNATURE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyProof {
    pub key: PeerKey,
    pub signature: [u8; 64],
}

fn signed_bytes(purpose: Purpose, tid: &TransactionId, id: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROLOGUE.len() + 16 + 12 + id.len());
    m.extend_from_slice(PROLOGUE);
    m.extend_from_slice(match purpose {
        Purpose::Register => b" register\0",
        Purpose::Unregister => b" unregister\0",
    });
    m.extend_from_slice(&tid.0);
    m.extend_from_slice(id.as_bytes());
    m
}

/// Whether `proof` is `proof.key`'s signature of `purpose` for transaction `tid` and id `id`.
pub fn verify(proof: &KeyProof, purpose: Purpose, tid: &TransactionId, id: &str) -> bool {
    let Some(v) = proof.key.verifying() else {
        return false;
    };
    let sig = Signature::from_bytes(&proof.signature);
    v.verify(&signed_bytes(purpose, tid, id), &sig).is_ok()
}

/// The rendezvous table's rule: an id registered by `held` may be refreshed (or moved to a new
/// address) only by the same key (issue 14, H1).
pub fn may_hold(held: &PeerKey, claimant: &PeerKey) -> bool {
    held == claimant
}

/// A peer's key pair.
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public())
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self::from_seed(self.seed())
    }
}

impl Identity {
    /// The key pair of a 32-byte Ed25519 secret (what a key file holds).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// A fresh key pair from `rng` (the driver seeds it from the OS).
    pub fn generate(rng: &mut impl Rng) -> Self {
        Self::from_seed(rng.gen())
    }

    /// The secret, for the key file.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> PeerKey {
        PeerKey(self.key.verifying_key().to_bytes())
    }

    /// Signs a REGISTER or UNREGISTER of `id` in transaction `tid`.
    pub fn prove(&self, purpose: Purpose, tid: &TransactionId, id: &str) -> KeyProof {
        KeyProof {
            key: self.public(),
            signature: self.key.sign(&signed_bytes(purpose, tid, id)).to_bytes(),
        }
    }

    fn noise_private(&self) -> [u8; 32] {
        self.key.to_scalar_bytes()
    }
}

/// snow's randomness (ephemeral keys) from a generator we seed: no OS entropy in the core.
struct SeededRandom(StdRng);

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

struct SeededResolver([u8; 32]);

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom(StdRng::from_seed(self.0))))
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }
    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }
    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

fn builder<'a>(rng: &mut impl Rng) -> Option<Builder<'a>> {
    let params = NOISE_PARAMS.parse().ok()?;
    Builder::with_resolver(params, Box::new(SeededResolver(rng.gen())))
        .prologue(PROLOGUE)
        .ok()
}

/// Nonces a receiver remembers: a path switch resends up to 256 messages at once and the
/// network reorders them, so the window is far wider than one burst.
const REPLAY_WINDOW: u64 = 4096;

/// A sliding window of [`REPLAY_WINDOW`] nonces: accepts each nonce once, and none older than
/// the window (a ring bitmap, as in RFC 6479).
#[derive(Debug, Clone)]
struct ReplayWindow {
    /// One more than the highest nonce accepted (0: none yet).
    top: u64,
    /// Bit `n % REPLAY_WINDOW`: nonce `n` (within the window) was accepted.
    bits: Box<[u64; (REPLAY_WINDOW / 64) as usize]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            top: 0,
            bits: Box::new([0; (REPLAY_WINDOW / 64) as usize]),
        }
    }
}

impl ReplayWindow {
    fn slot(n: u64) -> (usize, u64) {
        let i = n % REPLAY_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn fresh(&self, n: u64) -> bool {
        if n >= self.top {
            return true;
        }
        if n + REPLAY_WINDOW < self.top {
            return false;
        }
        let (w, b) = Self::slot(n);
        self.bits[w] & b == 0
    }

    fn mark(&mut self, n: u64) {
        if n >= self.top {
            // The slots of the nonces the window slides past are forgotten.
            if n - self.top >= REPLAY_WINDOW {
                self.bits.fill(0);
            } else {
                for m in self.top..=n {
                    let (w, b) = Self::slot(m);
                    self.bits[w] &= !b;
                }
            }
            self.top = n + 1;
        }
        let (w, b) = Self::slot(n);
        self.bits[w] |= b;
    }
}

enum State {
    /// Connector: msg1 sent, waiting for msg2.
    Initiator(Box<HandshakeState>),
    /// Listener: waiting for msg1.
    Responder(Box<HandshakeState>),
    Ready(Box<StatelessTransportState>),
    /// Only while a handshake state is moved out in [`Channel::handle_handshake`], or after
    /// snow failed on a message it had accepted (never seen; the channel is then dead).
    Broken,
}

/// What a handshake message did to the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The channel is up now.
    Completed,
    /// The listener got the connector's msg1 again (its msg2 was lost): send msg2 again.
    Repeated,
    /// Not a valid handshake message for this channel (forged, tampered, stray): dropped.
    Rejected,
}

/// One session's end-to-end channel: the Noise handshake, then sealing and opening.
pub struct Channel {
    state: State,
    /// The handshake message this side sends until the peer has proved it has the keys: msg1
    /// (connector) or msg2 (listener).
    handshake_out: Option<Vec<u8>>,
    /// The connector's msg1 the listener answered (a repeat gets msg2 again).
    answered: Option<Vec<u8>>,
    /// A message sealed by the peer was opened: it has the transport keys.
    peer_confirmed: bool,
    tx_nonce: u64,
    replay: ReplayWindow,
    auth_failures: u64,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Initiator(_) => "initiator",
            State::Responder(_) => "responder",
            State::Ready(_) => "ready",
            State::Broken => "broken",
        };
        f.debug_struct("Channel")
            .field("state", &state)
            .field("peer_confirmed", &self.peer_confirmed)
            .field("auth_failures", &self.auth_failures)
            .finish()
    }
}

impl Channel {
    fn with(state: State, handshake_out: Option<Vec<u8>>) -> Self {
        Self {
            state,
            handshake_out,
            answered: None,
            peer_confirmed: false,
            tx_nonce: 0,
            replay: ReplayWindow::default(),
            auth_failures: 0,
        }
    }

    /// The connector's side: IK toward `peer`, msg1 ready to send. `None` if `peer` is not a
    /// usable key.
    pub fn initiator(me: &Identity, peer: &PeerKey, rng: &mut impl Rng) -> Option<Self> {
        let private = me.noise_private();
        let remote = peer.noise_public()?;
        let mut hs = builder(rng)?
            .local_private_key(&private)
            .ok()?
            .remote_public_key(&remote)
            .ok()?
            .build_initiator()
            .ok()?;
        let mut msg1 = vec![0u8; MAX_HANDSHAKE];
        let n = hs.write_message(&[], &mut msg1).ok()?;
        msg1.truncate(n);
        Some(Self::with(State::Initiator(Box::new(hs)), Some(msg1)))
    }

    /// The listener's side: waits for the connector's msg1.
    pub fn responder(me: &Identity, rng: &mut impl Rng) -> Option<Self> {
        let private = me.noise_private();
        let hs = builder(rng)?
            .local_private_key(&private)
            .ok()?
            .build_responder()
            .ok()?;
        Some(Self::with(State::Responder(Box::new(hs)), None))
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    /// Messages for this session that failed authentication (forged, tampered or replayed).
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures
    }

    /// The handshake message to carry with what this side sends, until the peer proved it has
    /// the keys.
    pub fn handshake_out(&self) -> Option<&[u8]> {
        if self.peer_confirmed {
            return None;
        }
        self.handshake_out.as_deref()
    }

    /// A handshake message from the peer (or from anyone claiming to be it).
    pub fn handle_handshake(&mut self, msg: &[u8]) -> Option<Handshake> {
        if msg.len() > MAX_HANDSHAKE {
            self.auth_failures += 1;
            return Some(Handshake::Rejected);
        }
        let mut payload = [0u8; MAX_HANDSHAKE];
        let state = std::mem::replace(&mut self.state, State::Broken);
        let (next, outcome) = match state {
            State::Initiator(mut hs) => match hs.read_message(msg, &mut payload) {
                // snow restores its state on a failed read, so a forgery does not spoil the
                // handshake for the real msg2.
                Err(_) => (State::Initiator(hs), Handshake::Rejected),
                Ok(_) => match hs.into_stateless_transport_mode() {
                    Ok(t) => {
                        self.handshake_out = None;
                        // The listener sealed what carried msg2: it has the keys.
                        self.peer_confirmed = true;
                        (State::Ready(Box::new(t)), Handshake::Completed)
                    }
                    Err(_) => return None,
                },
            },
            State::Responder(mut hs) => match hs.read_message(msg, &mut payload) {
                Err(_) => (State::Responder(hs), Handshake::Rejected),
                Ok(_) => {
                    let mut msg2 = vec![0u8; MAX_HANDSHAKE];
                    let n = hs.write_message(&[], &mut msg2).ok()?;
                    msg2.truncate(n);
                    let t = hs.into_stateless_transport_mode().ok()?;
                    self.handshake_out = Some(msg2);
                    self.answered = Some(msg.to_vec());
                    (State::Ready(Box::new(t)), Handshake::Completed)
                }
            },
            State::Ready(t) => {
                let repeat = self.answered.as_deref() == Some(msg) && !self.peer_confirmed;
                (
                    State::Ready(t),
                    if repeat {
                        Handshake::Repeated
                    } else {
                        Handshake::Rejected
                    },
                )
            }
            State::Broken => (State::Broken, Handshake::Rejected),
        };
        self.state = next;
        if outcome == Handshake::Rejected {
            self.auth_failures += 1;
        }
        Some(outcome)
    }

    /// Seals `plain` for the peer: nonce (8 bytes, big endian) and ciphertext. `None` before the
    /// handshake completed.
    pub fn seal(&mut self, plain: &[u8]) -> Option<Vec<u8>> {
        let State::Ready(t) = &self.state else {
            return None;
        };
        let nonce = self.tx_nonce;
        let mut out = vec![0u8; 8 + plain.len() + 16];
        out[..8].copy_from_slice(&nonce.to_be_bytes());
        let n = t.write_message(nonce, plain, &mut out[8..]).ok()?;
        out.truncate(8 + n);
        self.tx_nonce += 1;
        Some(out)
    }

    /// Opens what the peer sealed; `None` (and one more authentication failure) for anything
    /// forged, tampered with or replayed.
    pub fn open(&mut self, sealed: &[u8]) -> Option<Vec<u8>> {
        let opened = self.try_open(sealed);
        match opened {
            Some(_) => self.peer_confirmed = true,
            None => self.auth_failures += 1,
        }
        opened
    }

    /// Whether `sealed` opens under this channel's keys and is fresh, without taking it: no
    /// nonce is marked and nothing counts as a failure (a listener asks each of its sessions
    /// whether a box that came through another relay is theirs, see `listener::hand_over`).
    pub fn verifies(&self, sealed: &[u8]) -> bool {
        let State::Ready(t) = &self.state else {
            return false;
        };
        let Some(nonce) = sealed
            .get(..8)
            .and_then(|n| n.try_into().ok())
            .map(u64::from_be_bytes)
        else {
            return false;
        };
        if sealed.len() < SEAL_OVERHEAD || !self.replay.fresh(nonce) {
            return false;
        }
        let mut plain = vec![0u8; sealed.len() - 8];
        t.read_message(nonce, &sealed[8..], &mut plain).is_ok()
    }

    fn try_open(&mut self, sealed: &[u8]) -> Option<Vec<u8>> {
        let State::Ready(t) = &self.state else {
            return None;
        };
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let nonce = u64::from_be_bytes(sealed[..8].try_into().ok()?);
        if !self.replay.fresh(nonce) {
            return None;
        }
        let mut plain = vec![0u8; sealed.len() - 8];
        let n = t.read_message(nonce, &sealed[8..], &mut plain).ok()?;
        plain.truncate(n);
        self.replay.mark(nonce);
        Some(plain)
    }
}

/// A connector's end of the channel, for tests that drive a listener (or a session) by hand.
#[cfg(test)]
pub(crate) struct TestPeer {
    ch: Channel,
    session: super::SessionId,
    rng: StdRng,
}

#[cfg(test)]
impl TestPeer {
    pub(crate) fn new(listener: &PeerKey, session: super::SessionId) -> Self {
        let mut rng = StdRng::seed_from_u64(session.0 ^ 0x7e57);
        let me = Identity::generate(&mut rng);
        let ch = Channel::initiator(&me, listener, &mut rng).expect("initiator");
        Self { ch, session, rng }
    }

    /// msg1, as it comes through the relay.
    pub(crate) fn msg1(&mut self) -> Vec<u8> {
        use super::codec::PunchMessage;
        PunchMessage::Sealed {
            tid: TransactionId::from_rng(&mut self.rng),
            session: self.session,
            handshake: self.ch.handshake_out().map(<[u8]>::to_vec),
            sealed: None,
        }
        .to_vec()
        .expect("enc")
    }

    /// Takes the listener's msg2 out of `bytes` if they carry it; whether the channel is up.
    pub(crate) fn take_msg2(&mut self, bytes: &[u8]) -> bool {
        use super::codec::PunchMessage;
        if let Ok(PunchMessage::Sealed {
            handshake: Some(h), ..
        }) = PunchMessage::decode(bytes)
        {
            if !self.ch.is_ready() {
                self.ch.handle_handshake(&h);
            }
        }
        self.ch.is_ready()
    }

    pub(crate) fn seal(&mut self, m: &super::codec::PunchMessage) -> Vec<u8> {
        use super::codec::PunchMessage;
        let sealed = self.ch.seal(&m.to_vec().expect("enc")).expect("ready");
        PunchMessage::Sealed {
            tid: TransactionId::from_rng(&mut self.rng),
            session: self.session,
            handshake: None,
            sealed: Some(sealed),
        }
        .to_vec()
        .expect("enc")
    }

    pub(crate) fn open(&mut self, bytes: &[u8]) -> Option<super::codec::PunchMessage> {
        use super::codec::PunchMessage;
        match PunchMessage::decode(bytes) {
            Ok(PunchMessage::Sealed {
                sealed: Some(b), ..
            }) => PunchMessage::decode(&self.ch.open(&b)?).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(n: u8) -> TransactionId {
        TransactionId([n; 16])
    }

    #[test]
    fn a_key_proof_verifies_only_for_its_purpose_transaction_id_and_key() {
        let me = Identity::from_seed([1; 32]);
        let p = me.prove(Purpose::Register, &tid(1), "bob");
        assert!(verify(&p, Purpose::Register, &tid(1), "bob"));
        assert!(!verify(&p, Purpose::Unregister, &tid(1), "bob"));
        assert!(!verify(&p, Purpose::Register, &tid(2), "bob"));
        assert!(!verify(&p, Purpose::Register, &tid(1), "bobby"));
        let other = Identity::from_seed([2; 32]).public();
        assert!(!verify(
            &KeyProof { key: other, ..p },
            Purpose::Register,
            &tid(1),
            "bob"
        ));
    }

    #[test]
    fn keys_print_and_parse_as_64_hex_digits() {
        let k = Identity::from_seed([3; 32]).public();
        let s = k.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<PeerKey>(), Ok(k));
        assert_eq!("abc".parse::<PeerKey>(), Err(KeyParseError::Format));
        assert_eq!(
            format!("{s}zz")[2..].parse::<PeerKey>(),
            Err(KeyParseError::Format)
        );
    }

    fn pair() -> (Channel, Channel) {
        let mut rng = StdRng::seed_from_u64(9);
        let l = Identity::from_seed([4; 32]);
        let c = Identity::from_seed([5; 32]);
        let mut i = Channel::initiator(&c, &l.public(), &mut rng).expect("i");
        let mut r = Channel::responder(&l, &mut rng).expect("r");
        let m1 = i.handshake_out().expect("msg1").to_vec();
        assert_eq!(r.handle_handshake(&m1), Some(Handshake::Completed));
        assert_eq!(r.handle_handshake(&m1), Some(Handshake::Repeated));
        let m2 = r.handshake_out().expect("msg2").to_vec();
        // A forged msg2 is rejected and does not spoil the handshake for the real one.
        let mut forged = m2.clone();
        forged[40] ^= 1;
        assert_eq!(i.handle_handshake(&forged), Some(Handshake::Rejected));
        assert_eq!(i.handle_handshake(&m2), Some(Handshake::Completed));
        (i, r)
    }

    #[test]
    fn sealed_messages_open_once_and_tampered_ones_never() {
        let (mut i, mut r) = pair();
        let a = i.seal(b"one").expect("seal");
        let b = i.seal(b"two").expect("seal");
        // Out of order is fine; a replay is not.
        assert_eq!(r.open(&b).as_deref(), Some(&b"two"[..]));
        assert_eq!(r.open(&a).as_deref(), Some(&b"one"[..]));
        assert_eq!(r.open(&a), None);
        let mut t = i.seal(b"three").expect("seal");
        let last = t.len() - 1;
        t[last] ^= 0x80;
        assert_eq!(r.open(&t), None);
        assert_eq!(r.auth_failures(), 2);
        // The other way too, and the responder stops sending msg2 once it heard from us.
        assert!(r.handshake_out().is_none());
        let back = r.seal(b"echo").expect("seal");
        assert_eq!(i.open(&back).as_deref(), Some(&b"echo"[..]));
    }

    #[test]
    fn a_handshake_toward_the_wrong_key_fails() {
        let mut rng = StdRng::seed_from_u64(1);
        let l = Identity::from_seed([4; 32]);
        let mallory = Identity::from_seed([6; 32]);
        let c = Identity::from_seed([5; 32]);
        // The connector expects `l`; mallory answers.
        let i = Channel::initiator(&c, &l.public(), &mut rng).expect("i");
        let mut m = Channel::responder(&mallory, &mut rng).expect("r");
        let m1 = i.handshake_out().expect("msg1").to_vec();
        assert_eq!(m.handle_handshake(&m1), Some(Handshake::Rejected));
        assert!(!m.is_ready());
    }

    #[test]
    fn the_replay_window_slides() {
        let mut w = ReplayWindow::default();
        for n in [0, 5, 3, 200] {
            assert!(w.fresh(n));
            w.mark(n);
            assert!(!w.fresh(n));
        }
        assert!(w.fresh(199) && w.fresh(100) && !w.fresh(5));
        w.mark(200 + REPLAY_WINDOW);
        assert!(!w.fresh(199), "older than the window");
        assert!(w.fresh(201 + 1) && !w.fresh(200 + REPLAY_WINDOW));
    }
}
