//! The few nfnetlink_queue messages the hold needs, built and parsed without I/O.
//!
//! ```text
//!   to the kernel:   config (bind, copy mode and range, queue length)   NLM_F_ACK
//!                    verdict (one packet id)  /  batch verdict (every id up to one)
//!   from the kernel: packet (id, captured length, first bytes)  /  error or ack  /  other
//! ```
//!
//! Layouts from `linux/netlink.h`, `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nfnetlink_queue.h`: the netlink header and attribute headers are in host
//! byte order, nfnetlink's values in network byte order. What comes back carries the first
//! bytes of datagrams a peer sent: [`parse`] never panics and never indexes past a length it
//! has not checked (a property test feeds it arbitrary bytes).

/// nfnetlink's subsystem id of the queue (`NFNL_SUBSYS_QUEUE`).
const SUBSYS_QUEUE: u16 = 3;
/// `NFQNL_MSG_PACKET`: a queued packet, kernel to user space.
const MSG_PACKET: u16 = 0;
/// `NFQNL_MSG_VERDICT`.
const MSG_VERDICT: u16 = 1;
/// `NFQNL_MSG_CONFIG`.
const MSG_CONFIG: u16 = 2;
/// `NFQNL_MSG_VERDICT_BATCH`: one verdict for every queued id up to the given one.
const MSG_VERDICT_BATCH: u16 = 3;

/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct nfgenmsg)`.
const NFGEN_LEN: usize = 4;
/// `sizeof(struct nlattr)`.
const NLA_HDRLEN: usize = 4;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
const NLM_F_ACK: u16 = 4;
/// The attribute type without the nested and byte-order flags (`NLA_TYPE_MASK`).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `NFQA_PACKET_HDR`: packet id (be32), hardware protocol (be16), hook (u8).
const NFQA_PACKET_HDR: u16 = 1;
/// `NFQA_VERDICT_HDR`: verdict (be32), id (be32).
const NFQA_VERDICT_HDR: u16 = 2;
/// `NFQA_PAYLOAD`: the packet's first bytes, from its network header on.
const NFQA_PAYLOAD: u16 = 10;
/// `NFQA_CAP_LEN`: the packet's full length when the payload was cut at the copy range.
const NFQA_CAP_LEN: u16 = 13;

/// `NFQA_CFG_CMD`: command (u8), pad (u8), protocol family (be16).
const NFQA_CFG_CMD: u16 = 1;
/// `NFQA_CFG_PARAMS`: copy range (be32), copy mode (u8).
const NFQA_CFG_PARAMS: u16 = 2;
/// `NFQA_CFG_QUEUE_MAXLEN` (be32).
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
/// `NFQNL_CFG_CMD_BIND`.
const CFG_CMD_BIND: u8 = 1;
/// `NFQNL_COPY_PACKET`: copy the packet's first `copy range` bytes.
const COPY_PACKET: u8 = 2;

/// The verdicts the hold gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `NF_DROP`.
    Drop,
    /// `NF_ACCEPT`: the packet goes on from the hook entry after the one that queued it.
    Accept,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Self::Drop => 0,
            Self::Accept => 1,
        }
    }
}

/// The configuration message that binds `queue` to this socket and sets how packets are
/// copied (`copy_range` first bytes of each) and how many the kernel keeps queued at most.
pub(crate) fn bind_config(seq: u32, queue: u16, copy_range: u32, max_len: u32) -> Vec<u8> {
    let mut cmd = [0u8; 4];
    cmd[0] = CFG_CMD_BIND;
    // Protocol family 0 (AF_UNSPEC), ignored by BIND since Linux 3.8.
    let mut params = [0u8; 5];
    params[..4].copy_from_slice(&copy_range.to_be_bytes());
    params[4] = COPY_PACKET;
    message(
        MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        queue,
        &[
            (NFQA_CFG_CMD, &cmd),
            (NFQA_CFG_PARAMS, &params),
            (NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes()),
        ],
    )
}

/// The verdict for one packet.
pub(crate) fn verdict(queue: u16, id: u32, verdict: Verdict) -> Vec<u8> {
    verdict_message(MSG_VERDICT, queue, id, verdict)
}

/// One verdict for every packet of `queue` whose id is `max_id` or before it (in the kernel's
/// wrapping order). The kernel applies it in queue order, which is arrival order.
pub(crate) fn verdict_batch(queue: u16, max_id: u32, verdict: Verdict) -> Vec<u8> {
    verdict_message(MSG_VERDICT_BATCH, queue, max_id, verdict)
}

fn verdict_message(kind: u16, queue: u16, id: u32, verdict: Verdict) -> Vec<u8> {
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&verdict.code().to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    // No NLM_F_ACK: a failed verdict still comes back as an error message.
    message(kind, NLM_F_REQUEST, 0, queue, &[(NFQA_VERDICT_HDR, &hdr)])
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

fn message(kind: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0; 4]); // length, filled in below
    buf.extend_from_slice(&((SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    // struct nfgenmsg: family AF_UNSPEC, NFNETLINK_V0, resource id = queue number.
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&queue.to_be_bytes());
    for (kind, value) in attrs {
        let len = NLA_HDRLEN + value.len();
        // Attribute values here are at most 8 bytes: the length fits in u16.
        buf.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(value);
        buf.resize(align4(buf.len()), 0);
    }
    let total = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&total.to_ne_bytes());
    buf
}

/// A packet the kernel queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Packet {
    /// The id a verdict names.
    pub(crate) id: u32,
    /// The packet's length in bytes from its IP header on: the captured length when the
    /// kernel cut the copy, else the length of the copy.
    pub(crate) len: u32,
}

/// One netlink message from the kernel, as far as the hold cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A queued packet.
    Packet(Packet),
    /// The answer to a request: `errno` 0 is an acknowledgement, else the (positive) error.
    Answer {
        /// The request's sequence number.
        seq: u32,
        /// 0 or a positive errno.
        errno: i32,
    },
    /// Anything else (another message type, a packet message without a packet header).
    Ignored,
}

/// Why a datagram from the netlink socket could not be read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// A message header, or a length it gives, runs past the end of the datagram.
    #[error("truncated netlink message at offset {offset}")]
    Truncated {
        /// Where the bad message starts.
        offset: usize,
    },
}

/// Splits one datagram read from the netlink socket into its messages. Stops at the first
/// malformed message: what was parsed before it is kept, the error is the last item.
pub(crate) fn parse(datagram: &[u8]) -> Vec<Result<Incoming, ParseError>> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let rest = &datagram[offset..];
        let Some(header) = rest.get(..NLMSG_HDRLEN) else {
            out.push(Err(ParseError::Truncated { offset }));
            break;
        };
        let len = usize::try_from(u32_ne(header, 0)).unwrap_or(usize::MAX);
        let Some(body) = (len >= NLMSG_HDRLEN)
            .then(|| rest.get(NLMSG_HDRLEN..len))
            .flatten()
        else {
            out.push(Err(ParseError::Truncated { offset }));
            break;
        };
        let kind = u16_ne(header, 4);
        out.push(Ok(one(kind, u32_ne(header, 8), body)));
        offset = offset.saturating_add(align4(len));
    }
    out
}

fn one(kind: u16, seq: u32, body: &[u8]) -> Incoming {
    if kind == NLMSG_ERROR {
        // struct nlmsgerr: int error (negative errno or 0), then the request's header.
        return match body.get(..4) {
            Some(b) => Incoming::Answer {
                seq,
                errno: i32::from_ne_bytes([b[0], b[1], b[2], b[3]]).saturating_abs(),
            },
            None => Incoming::Ignored,
        };
    }
    if kind != (SUBSYS_QUEUE << 8) | MSG_PACKET {
        return Incoming::Ignored;
    }
    let mut id = None;
    let mut payload_len = None;
    let mut cap_len = None;
    for (kind, value) in attributes(body.get(NFGEN_LEN..).unwrap_or(&[])) {
        match kind {
            NFQA_PACKET_HDR => id = value.get(..4).map(|b| u32_be(b, 0)),
            NFQA_PAYLOAD => payload_len = u32::try_from(value.len()).ok(),
            NFQA_CAP_LEN => cap_len = value.get(..4).map(|b| u32_be(b, 0)),
            _ => {}
        }
    }
    match id {
        Some(id) => Incoming::Packet(Packet {
            id,
            len: cap_len.or(payload_len).unwrap_or(0),
        }),
        None => Incoming::Ignored,
    }
}

/// The attributes of a message body: (type without flags, value). Stops at the first one whose
/// length does not fit.
fn attributes(mut body: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let header = body.get(..NLA_HDRLEN)?;
        let len = usize::from(u16_ne(header, 0));
        let value = (len >= NLA_HDRLEN)
            .then(|| body.get(NLA_HDRLEN..len))
            .flatten()?;
        let kind = u16_ne(header, 2) & NLA_TYPE_MASK;
        body = body.get(align4(len)..).unwrap_or(&[]);
        Some((kind, value))
    })
}

/// Reads at `at`; callers pass slices whose length they checked.
fn u16_ne(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[x, y]) => u16::from_ne_bytes([x, y]),
        _ => 0,
    }
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[w, x, y, z]) => u32::from_ne_bytes([w, x, y, z]),
        _ => 0,
    }
}

fn u32_be(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[w, x, y, z]) => u32::from_be_bytes([w, x, y, z]),
        _ => 0,
    }
}

/// The kernel's counters of one queue, from `/proc/net/netfilter/nfnetlink_queue` (read in
/// the queue's network namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KernelCounters {
    /// Packets the kernel dropped because the queue was full (`queue_dropped`).
    pub(crate) queue_dropped: u64,
    /// Packets it dropped because the netlink socket could not take them (`queue_user_dropped`).
    pub(crate) user_dropped: u64,
    /// Packets waiting for a verdict now (`queue_total`).
    pub(crate) queued: u64,
}

/// The counters of `queue` in the text of `/proc/net/netfilter/nfnetlink_queue`:
/// `queue_number peer_portid queue_total copy_mode copy_range queue_dropped
/// queue_user_dropped id_sequence 1`, one line per queue. `None` when no line names it.
pub(crate) fn kernel_counters(text: &str, queue: u16) -> Option<KernelCounters> {
    text.lines().find_map(|line| {
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        match fields.as_slice() {
            [number, _, total, _, _, dropped, user_dropped, ..] if *number == u64::from(queue) => {
                Some(KernelCounters {
                    queue_dropped: *dropped,
                    user_dropped: *user_dropped,
                    queued: *total,
                })
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A packet message as the kernel builds it: header, nfgenmsg, attributes.
    fn packet_message(id: u32, payload: &[u8], cap_len: Option<u32>) -> Vec<u8> {
        let mut hdr = [0u8; 7];
        hdr[..4].copy_from_slice(&id.to_be_bytes());
        hdr[4..6].copy_from_slice(&0x0800u16.to_be_bytes());
        let cap = cap_len.map(u32::to_be_bytes);
        let mut attrs: Vec<(u16, &[u8])> = vec![(NFQA_PACKET_HDR, &hdr), (NFQA_PAYLOAD, payload)];
        if let Some(cap) = &cap {
            attrs.push((NFQA_CAP_LEN, cap));
        }
        message(MSG_PACKET, 0, 0, 7, &attrs)
    }

    #[test]
    fn golden_bind_config() {
        let m = bind_config(9, 0x1234, 68, 1024);
        let expected: Vec<u8> = [
            &48u32.to_ne_bytes()[..],
            &0x0302u16.to_ne_bytes(),
            &5u16.to_ne_bytes(),
            &9u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &[0, 0, 0x12, 0x34],
            &8u16.to_ne_bytes(),
            &1u16.to_ne_bytes(),
            &[1, 0, 0, 0],
            &9u16.to_ne_bytes(),
            &2u16.to_ne_bytes(),
            &[0, 0, 0, 68, 2, 0, 0, 0],
            &8u16.to_ne_bytes(),
            &3u16.to_ne_bytes(),
            &[0, 0, 4, 0],
        ]
        .concat();
        assert_eq!(m, expected);
    }

    #[test]
    fn golden_verdicts() {
        let one = verdict(7, 0x0102_0304, Verdict::Accept);
        assert_eq!(one.len(), 32);
        assert_eq!(&one[4..6], &0x0301u16.to_ne_bytes());
        assert_eq!(&one[24..32], &[0, 0, 0, 1, 1, 2, 3, 4]);
        let batch = verdict_batch(7, 5, Verdict::Drop);
        assert_eq!(&batch[4..6], &0x0303u16.to_ne_bytes());
        assert_eq!(&batch[24..32], &[0, 0, 0, 0, 0, 0, 0, 5]);
    }

    #[test]
    fn a_packet_with_and_without_cap_len() {
        let full = packet_message(42, &[0x45; 28], None);
        assert_eq!(
            parse(&full),
            vec![Ok(Incoming::Packet(Packet { id: 42, len: 28 }))]
        );
        let cut = packet_message(43, &[0x45; 68], Some(1228));
        let two = [full.clone(), cut].concat();
        assert_eq!(
            parse(&two),
            vec![
                Ok(Incoming::Packet(Packet { id: 42, len: 28 })),
                Ok(Incoming::Packet(Packet { id: 43, len: 1228 })),
            ]
        );
    }

    #[test]
    fn answers_and_truncation() {
        let mut err = message(0, 0, 77, 0, &[]);
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.truncate(NLMSG_HDRLEN);
        err.extend_from_slice(&(-16i32).to_ne_bytes());
        let len = u32::try_from(err.len()).unwrap();
        err[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            parse(&err),
            vec![Ok(Incoming::Answer { seq: 77, errno: 16 })]
        );
        let full = packet_message(1, &[0; 20], None);
        let cut = &full[..full.len() - 1];
        assert_eq!(parse(cut), vec![Err(ParseError::Truncated { offset: 0 })]);
        let mut zero = full.clone();
        zero[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse(&zero), vec![Err(ParseError::Truncated { offset: 0 })]);
    }

    #[test]
    fn kernel_counters_from_proc_text() {
        let text =
            "    0  12345     3 2    68     5     2       99  1\n    7 100 1 2 68 9 4 1000 1\n";
        assert_eq!(
            kernel_counters(text, 7),
            Some(KernelCounters {
                queue_dropped: 9,
                user_dropped: 4,
                queued: 1
            })
        );
        assert_eq!(kernel_counters(text, 8), None);
        assert_eq!(kernel_counters("garbage 7 x\n7\n", 7), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn any_packet_round_trips(
            id in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            cap in proptest::option::of(any::<u32>()),
        ) {
            let m = packet_message(id, &payload, cap);
            let len = cap.unwrap_or(u32::try_from(payload.len()).unwrap());
            prop_assert_eq!(parse(&m), vec![Ok(Incoming::Packet(Packet { id, len }))]);
        }

        #[test]
        fn corrupted_packets_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..100),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut m = packet_message(3, &payload, None);
            let i = at.index(m.len());
            m[i] = byte;
            let _ = parse(&m);
        }
    }
}
