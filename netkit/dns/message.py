"""DNS messages, on dnslib: parsing queries from guests (untrusted), building replies,
fitting a reply into a UDP datagram. No I/O, no clock.

A query from a guest is parsed step by step rather than with ``DNSRecord.parse``: the
header first (so that anything with a readable header gets an answer), then exactly one
question and at most a couple of additional records. That bounds the work one message
can cause (dnslib follows compression pointers recursively) and lets every failure be
answered with the right code instead of an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

from dnslib import CLASS, EDNS0, QTYPE, RCODE, RR, DNSBuffer, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

__all__ = [
    "Query", "BadQuery", "Question", "parse_query_untrusted", "name_key", "reply_for",
    "error_reply", "fit_udp", "with_edns", "REFUSED_TYPES", "OPCODE_QUERY", "TYPE_OPT", "MAX_MESSAGE_LEN",
    "CLIENT_EDNS_PAYLOAD", "UPSTREAM_EDNS_PAYLOAD",
]

OPCODE_QUERY = 0
TYPE_OPT = QTYPE.OPT
TYPE_TSIG = 250
TYPE_SIG = 24
#: Zone transfers and the obsolete mail meta-types are not something a stub asks for, and
#: a forwarder cannot pass a multi-message transfer through; they get REFUSED.
REFUSED_TYPES = frozenset({QTYPE.AXFR, QTYPE.IXFR, 253, 254})
#: The UDP payload size netkit advertises to guests (and the most it sends them).
CLIENT_EDNS_PAYLOAD = 1232
#: The UDP payload size netkit advertises upstream (DNS flag day 2020: avoids IP fragments).
UPSTREAM_EDNS_PAYLOAD = 1232
#: The largest DNS message, the limit of the TCP length prefix.
MAX_MESSAGE_LEN = 65535
#: A query bigger than this is not a query a stub sends (one question, an OPT record).
MAX_QUERY_LEN = 4096
#: Additional records a query may carry: OPT and perhaps TSIG/SIG(0).
_MAX_QUERY_ADDITIONAL = 2
_EDNS_BADVERS = 16


def name_key(name: DNSLabel | str) -> tuple[bytes, ...]:
    """The case-insensitive identity of a name: its labels, lower-cased."""
    if not isinstance(name, DNSLabel):
        name = DNSLabel(name)
    return tuple(label.lower() for label in name.label)


@dataclass(frozen=True, slots=True)
class Question:
    """What netkit asks a resolver: a question plus the DNSSEC bits that change the answer."""

    qname: DNSLabel
    qtype: int
    qclass: int = CLASS.IN
    #: The client set EDNS DO (wants DNSSEC records).
    do: bool = False
    #: The client set CD (checking disabled).
    cd: bool = False

    @property
    def key(self) -> tuple:
        return (name_key(self.qname), self.qtype, self.qclass, self.do, self.cd)

    def matches(self, question: DNSQuestion) -> bool:
        return (question.qtype == self.qtype and question.qclass == self.qclass
                and name_key(question.qname) == name_key(self.qname))


@dataclass(slots=True)
class Query:
    """A query from a guest, validated: one question, an optional OPT record."""

    header: DNSHeader
    question: DNSQuestion
    #: The client's OPT record, or None when it did not use EDNS.
    edns: RR | None

    @property
    def id(self) -> int:
        return self.header.id

    @property
    def do(self) -> bool:
        return bool(self.edns is not None and self.edns.edns_do)

    @property
    def cd(self) -> bool:
        return bool(self.header.cd)

    def udp_limit(self, mtu: int) -> int:
        """The largest UDP reply this client takes: 512, or its EDNS payload size, but
        never more than one IP packet on the link (the gateway does not fragment)."""
        limit = 512
        if self.edns is not None:
            limit = max(512, min(self.edns.edns_len, CLIENT_EDNS_PAYLOAD))
        return min(limit, mtu - 28)

    def as_question(self) -> Question:
        q = self.question
        return Question(q.qname, q.qtype, q.qclass, self.do, self.cd)


class BadQuery(Exception):
    """A query that gets an error reply (``reply``) or, when ``reply`` is None, no reply."""

    def __init__(self, reason: str, reply: DNSRecord | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def parse_query_untrusted(data: bytes | bytearray | memoryview) -> Query:
    """Parse a query from a guest. Raise only :class:`BadQuery`."""
    data = bytes(data)
    if len(data) < 12:
        raise BadQuery("short header")
    buffer = DNSBuffer(data)
    try:
        header = DNSHeader.parse(buffer)
    except Exception:  # pragma: no cover - 12 bytes always parse
        raise BadQuery("header") from None
    if header.qr:
        # A response sent to the server: answering it could start a loop between two
        # servers (and it is what a reflection attack looks like). Drop it.
        raise BadQuery("response")
    if header.opcode != OPCODE_QUERY:
        raise BadQuery("opcode", error_reply(header, RCODE.NOTIMP))
    if len(data) > MAX_QUERY_LEN:
        raise BadQuery("too long", error_reply(header, RCODE.FORMERR))
    if header.q != 1 or header.a or header.auth or header.ar > _MAX_QUERY_ADDITIONAL:
        raise BadQuery("section counts", error_reply(header, RCODE.FORMERR))
    try:
        question = DNSQuestion.parse(buffer)
    except Exception:  # dnslib raises DNSError, and RecursionError on pointer chains
        raise BadQuery("question", error_reply(header, RCODE.FORMERR)) from None
    edns = None
    try:
        additional = [RR.parse(buffer) for _ in range(header.ar)]
    except Exception:
        raise BadQuery("additional", error_reply(header, RCODE.FORMERR, question)) from None
    opts = [rr for rr in additional if rr.rtype == TYPE_OPT]
    if len(opts) > 1 or (opts and opts[0].rname.label):
        # RFC 6891 6.1.1: more than one OPT, or one not owned by the root, is FORMERR.
        raise BadQuery("OPT", error_reply(header, RCODE.FORMERR, question))
    if opts:
        edns = opts[0]
        if edns.edns_ver != 0:
            reply = error_reply(header, _EDNS_BADVERS & 0xF, question)
            reply.add_ar(EDNS0(udp_len=CLIENT_EDNS_PAYLOAD, ext_rcode=_EDNS_BADVERS >> 4))
            raise BadQuery("EDNS version", reply)
    if any(len(label) > 63 for label in question.qname.label) or len(question.qname) > 253:
        raise BadQuery("name too long", error_reply(header, RCODE.FORMERR, question))
    return Query(header, question, edns)


def _reply_header(header: DNSHeader, rcode: int) -> DNSHeader:
    return DNSHeader(id=header.id, bitmap=0, qr=1, opcode=header.opcode, rd=header.rd,
                     cd=header.cd, ra=1, rcode=rcode)


def error_reply(header: DNSHeader, rcode: int, question: DNSQuestion | None = None) -> DNSRecord:
    """A reply with ``rcode`` and no records (and the question, when it was readable)."""
    return DNSRecord(_reply_header(header, rcode), questions=[question] if question else [])


def reply_for(query: Query, rcode: int = RCODE.NOERROR, *, aa: bool = False) -> DNSRecord:
    """An empty reply to ``query``; :func:`pack_reply` adds the OPT record."""
    reply = DNSRecord(_reply_header(query.header, rcode), questions=[query.question])
    reply.header.aa = int(aa)
    return reply


def with_edns(reply: DNSRecord, query_edns: RR | None) -> DNSRecord:
    """Drop any OPT (and transaction signatures, which cannot survive a forwarder) from
    ``reply``; add netkit's own OPT when the client used EDNS (RFC 6891 7)."""
    reply.ar = [rr for rr in reply.ar if rr.rtype not in (TYPE_OPT, TYPE_TSIG, TYPE_SIG)]
    if query_edns is not None:
        reply.ar.append(EDNS0(udp_len=CLIENT_EDNS_PAYLOAD, flags="do" if query_edns.edns_do else ""))
    reply.set_header_qa()
    return reply


def fit_udp(reply: DNSRecord, wire: bytes, limit: int) -> tuple[bytes, bool]:
    """``wire`` if it fits in ``limit`` bytes, else the header and question with TC set
    (and the OPT record), so the client retries over TCP. Returns (bytes, truncated)."""
    if len(wire) <= limit:
        return wire, False
    header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
    header.tc = 1
    short = DNSRecord(header, questions=list(reply.questions),
                      ar=[rr for rr in reply.ar if rr.rtype == TYPE_OPT])
    out = short.pack()
    if len(out) > limit:  # a question that alone overflows: the header must do
        short.questions = []
        out = short.pack()
    return out, True
