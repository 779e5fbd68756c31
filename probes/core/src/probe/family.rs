//! Both address families in one probe run (issue 13): which families to probe, what the IPv6
//! classification adds to the RFC 5780 verdicts (is there translation at all, and of which kind),
//! what IPv6 means for direct connections, and the side-by-side rows the table shows.
//!
//! The RFC 5780 tests themselves are family-blind: the same [`super::Probe`] runs against a
//! server's IPv6 addresses, and its filtering verdict is then the verdict of the IPv6 firewall in
//! front of the host (RFC 6092 gateways filter but rarely translate). What only IPv6 asks is
//! whether the host's address is translated, judged from what the probe saw and nothing else:
//! - `none`: the mapped address is the local address and port (no translation; any filtering is a
//!   firewall's);
//! - `nptv6`: stateless prefix translation (RFC 6296): every port kept, one external address for
//!   every destination (endpoint-independent mapping, paired pooling), and the address differs
//!   only in its prefix, with the interface identifier either kept or changed in one 16-bit word
//!   by the checksum-neutral adjustment (the one's-complement sums of both addresses are equal);
//! - `nat66`: stateful translation: a port was changed, the mapping depends on the destination,
//!   mappings got different addresses, or the address was rewritten in a way no stateless prefix
//!   translator produces;
//! - `unknown`: not enough evidence (no answer, unknown mapping, no port sample).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::report::{AddressPooling, Behavior, ProbeReport};

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: SocketAddr) -> Self {
        if addr.is_ipv4() {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }
}

/// `--family`: which families to probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FamilyChoice {
    /// Every family the server has an address of (a name that resolves to both: both).
    #[default]
    Auto,
    V4,
    V6,
    Both,
}

impl FamilyChoice {
    /// `4`, `6`, `both` or `auto`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "4" | "ipv4" => Ok(Self::V4),
            "6" | "ipv6" => Ok(Self::V6),
            "both" => Ok(Self::Both),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("{s:?}: expected 4, 6, both or auto")),
        }
    }

    /// The server addresses to probe, from the server's address of each family (`None`: it has
    /// none). An explicit family the server lacks is an error that says so.
    pub fn select(
        self,
        v4: Option<SocketAddr>,
        v6: Option<SocketAddr>,
    ) -> Result<Families<SocketAddr>, String> {
        let need = |a: Option<SocketAddr>, f: &str| {
            a.map(Some).ok_or_else(|| {
                format!("the server has no {f} address: name one that resolves to {f}, or drop --family")
            })
        };
        let (ipv4, ipv6) = match self {
            Self::Auto => (v4, v6),
            Self::V4 => (need(v4, "ipv4")?, None),
            Self::V6 => (None, need(v6, "ipv6")?),
            Self::Both => (need(v4, "ipv4")?, need(v6, "ipv6")?),
        };
        if ipv4.is_none() && ipv6.is_none() {
            return Err("the server has no address to probe".into());
        }
        Ok(Families { ipv4, ipv6 })
    }
}

/// One value per family, either possibly absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families<T> {
    pub ipv4: Option<T>,
    pub ipv6: Option<T>,
}

impl<T> Default for Families<T> {
    fn default() -> Self {
        Self {
            ipv4: None,
            ipv6: None,
        }
    }
}

/// Whether and how IPv6 addresses are translated between the host and the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Translation {
    /// The server saw the host's own address and port.
    None,
    /// Stateless prefix translation (RFC 6296-like).
    Nptv6,
    /// Stateful translation (NAT66).
    Nat66,
    Unknown,
}

impl Translation {
    pub fn short(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Nptv6 => "nptv6",
            Self::Nat66 => "nat66",
            Self::Unknown => "unknown",
        }
    }
}

/// The IPv6 family's result: the RFC 5780 report of the IPv6 run, plus what only IPv6 asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Ipv6Report {
    /// Whether the host's IPv6 address is translated (see the module comment).
    pub translation: Translation,
    /// What the translation verdict rests on.
    pub translation_evidence: String,
    /// What IPv6 means for direct connections, in one sentence.
    pub outlook: String,
    /// The whole `natscope.probe/v1` report of the IPv6 run.
    pub report: ProbeReport,
}

impl Ipv6Report {
    pub fn new(report: ProbeReport) -> Self {
        let (translation, translation_evidence) = translation(&report);
        let outlook = ipv6_outlook(&report, translation);
        Self {
            translation,
            translation_evidence,
            outlook,
            report,
        }
    }
}

/// The document's `ipv6` object: the IPv6 run beside an IPv4 `primary`, or `primary` itself when
/// IPv6 was the only family probed.
pub fn ipv6_of(
    family: Family,
    primary: &ProbeReport,
    beside: Option<ProbeReport>,
) -> Option<Ipv6Report> {
    match family {
        Family::Ipv6 => Some(Ipv6Report::new(primary.clone())),
        Family::Ipv4 => beside.map(Ipv6Report::new),
    }
}

/// The lines the human form adds for IPv6: the translation verdict with its evidence, and the
/// IPv6 outlook.
pub fn notes(v6: &Ipv6Report) -> [String; 2] {
    [
        format!(
            "IPv6 translation: {} ({})",
            v6.translation.short(),
            v6.translation_evidence
        ),
        v6.outlook.clone(),
    ]
}

/// One's-complement sum of an address's eight 16-bit words, with 0xFFFF and 0 the same value
/// (RFC 1071), as RFC 6296 §3.1's checksum neutrality is defined over.
fn ones_complement_sum(a: Ipv6Addr) -> u16 {
    let mut s: u32 = a.segments().iter().map(|&w| u32::from(w)).sum();
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    if s == 0xFFFF {
        0
    } else {
        s as u16
    }
}

/// Whether `external` is a stateless prefix translation of `internal`: the interface identifier
/// kept (the prefix replaced, RFC 6296 /48 form or a plain prefix map), or changed in exactly one
/// 16-bit word with both addresses' one's-complement sums equal (RFC 6296 §3.4, prefixes longer
/// than /48). `None` when neither holds; else what held.
pub fn prefix_translation(internal: Ipv6Addr, external: Ipv6Addr) -> Option<&'static str> {
    let (i, e) = (internal.segments(), external.segments());
    if i[4..] == e[4..] {
        return Some("interface identifier kept, prefix replaced");
    }
    let changed = i[4..].iter().zip(&e[4..]).filter(|(a, b)| a != b).count();
    (changed == 1 && ones_complement_sum(internal) == ones_complement_sum(external))
        .then_some("one interface-identifier word changed, checksum-neutral (rfc 6296 §3.4)")
}

/// The translation verdict and its evidence, from an IPv6 run's report alone.
pub fn translation(r: &ProbeReport) -> (Translation, String) {
    use Translation as T;
    if r.udp_blocked {
        return (T::Unknown, "no answer over ipv6".into());
    }
    let (Some(local), Some(public)) = (r.local_address, r.public_address) else {
        return (T::Unknown, "no mapped address seen".into());
    };
    let (IpAddr::V6(li), IpAddr::V6(pi)) = (local.ip(), public.ip()) else {
        return (T::Unknown, "not an ipv6 run".into());
    };
    match r.nat_detected {
        Some(false) => {
            return (
                T::None,
                format!("the mapped address is the local address and port, {local}"),
            )
        }
        None => {
            return (
                T::Unknown,
                "whether the address is translated is unknown".into(),
            )
        }
        Some(true) => {}
    }
    // Positive evidence of state first: any one of these is something no stateless prefix
    // translator does.
    let changed_port = std::iter::once((local.port(), public.port()))
        .chain(r.port_allocation.samples.iter().copied())
        .find(|(l, e)| l != e);
    if let Some((l, e)) = changed_port {
        return (
            T::Nat66,
            format!("port {l} was mapped to {e}: stateful translation"),
        );
    }
    if matches!(
        r.mapping,
        Behavior::AddressDependent | Behavior::AddressAndPortDependent
    ) {
        return (
            T::Nat66,
            format!(
                "mapping is {}: the external address or port depends on the destination",
                r.mapping.short()
            ),
        );
    }
    if r.address_pooling == Some(AddressPooling::Arbitrary) {
        return (
            T::Nat66,
            "sockets of this host got different external addresses".into(),
        );
    }
    let Some(how) = prefix_translation(li, pi) else {
        return (
            T::Nat66,
            format!("{pi} is not a stateless prefix translation of {li}"),
        );
    };
    if r.mapping != Behavior::EndpointIndependent {
        return (
            T::Unknown,
            format!("{how}, but the mapping is unknown: cannot tell stateless from stateful"),
        );
    }
    if r.port_preservation != Some(true) {
        return (
            T::Unknown,
            format!("{how}, but too few port samples to say every port is kept"),
        );
    }
    (
        T::Nptv6,
        format!("{li} → {pi}: {how}; ports kept; one external address for every destination"),
    )
}

/// What IPv6 means for direct connections with peers that have IPv6 (the question users ask:
/// "does IPv6 solve this?").
pub fn ipv6_outlook(r: &ProbeReport, t: Translation) -> String {
    if r.udp_blocked {
        return "IPv6: no answer over IPv6 (UDP blocked or no IPv6 route): peers must use IPv4 or a relay".into();
    }
    if t == Translation::Nat66
        && matches!(
            r.mapping,
            Behavior::AddressDependent | Behavior::AddressAndPortDependent
        )
    {
        return format!(
            "IPv6: a stateful NAT66 maps per destination ({}): direct IPv6 connections need port prediction or a relay, as behind a symmetric IPv4 NAT",
            r.mapping.short()
        );
    }
    let via = match t {
        Translation::Nptv6 => {
            " (behind stateless prefix translation: share the translated address)"
        }
        Translation::Nat66 => " (behind NAT66: share the mapped address, not the local one)",
        Translation::None | Translation::Unknown => "",
    };
    let what = match r.filtering {
        Behavior::EndpointIndependent => {
            "direct connections work with peers that have IPv6 — your firewall admits anyone you have talked to (EIF)"
        }
        Behavior::AddressDependent => {
            "direct connections work with peers that have IPv6 once both sides send — your firewall admits only addresses you have talked to (ADF): both sides must punch"
        }
        Behavior::AddressAndPortDependent => {
            "direct connections work with peers that have IPv6 only by punching — your firewall admits only the exact address and port (APDF): both sides must punch"
        }
        Behavior::Unknown => "unknown — the filtering test gave no verdict",
    };
    format!("IPv6: {what}{via}")
}

fn tri(v: Option<bool>) -> String {
    match v {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "unknown".into(),
    }
}

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".into(), |a| a.to_string())
}

/// The side-by-side table: one row per property, `[property, IPv4, IPv6]`; a family not probed
/// shows `-`. The CLI only loops over these rows.
pub fn rows(v4: Option<&ProbeReport>, v6: Option<&Ipv6Report>) -> Vec<[String; 3]> {
    type Cell = fn(&ProbeReport) -> String;
    let cells: [(&str, Cell); 10] = [
        ("server", |r| r.server.address.to_string()),
        ("local address", |r| addr(r.local_address)),
        ("public address", |r| addr(r.public_address)),
        ("udp", |r| {
            if r.udp_blocked {
                "blocked".into()
            } else {
                "answered".into()
            }
        }),
        ("nat", |r| tri(r.nat_detected)),
        ("mapping", |r| r.mapping.short().into()),
        ("filtering", |r| r.filtering.short().into()),
        ("port preservation", |r| tri(r.port_preservation)),
        ("hairpinning", |r| tri(r.hairpinning)),
        ("classic", |r| r.classic.describe().into()),
    ];
    let dash = || "-".to_string();
    let mut out: Vec<[String; 3]> = cells
        .iter()
        .map(|(name, f)| {
            [
                (*name).to_string(),
                v4.map_or_else(dash, f),
                v6.map_or_else(dash, |x| f(&x.report)),
            ]
        })
        .collect();
    out.push([
        "translation".into(),
        dash(),
        v6.map_or_else(dash, |x| x.translation.short().into()),
    ]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn rfc6296_checksum_neutral_translation_is_recognized() {
        // RFC 6296 §3.3's /48 example: fd01:0203:0405::/48 ↔ 2001:0db8:0001::/48, the subnet word
        // adjusted to 0xd550 (IID kept).
        let int = v6("fd01:203:405:1::1234");
        let ext = v6("2001:db8:1:d550::1234");
        assert_eq!(ones_complement_sum(int), ones_complement_sum(ext));
        assert!(prefix_translation(int, ext).is_some());
        // A /64 translator adjusts the first IID word instead.
        let int = v6("fd00:1:2:3:a:b:c:d");
        let mut e = v6("2001:db8:9:3:a:b:c:d").segments();
        let delta = {
            let s = |a: Ipv6Addr| ones_complement_sum(a) as u32;
            // x + (old − new) in one's complement.
            let (si, se) = (s(int), s(Ipv6Addr::from(e)));
            let mut v = u32::from(e[4]) + si + (0xFFFF - se);
            while v > 0xFFFF {
                v = (v & 0xFFFF) + (v >> 16);
            }
            v as u16
        };
        e[4] = delta;
        let ext = Ipv6Addr::from(e);
        assert_eq!(ones_complement_sum(int), ones_complement_sum(ext));
        assert!(prefix_translation(int, ext).is_some(), "{ext}");
        // Two IID words changed, or one changed without neutrality: not a prefix translation.
        assert_eq!(
            prefix_translation(int, v6("2001:db8:9:3:a:b:1:2")),
            None,
            "two words"
        );
        assert_eq!(prefix_translation(int, v6("2001:db8:9:3:a:b:c:e")), None);
    }

    /// The traversal model needs no family input: an IPv6 host behind an RFC 6092 firewall (or
    /// NPTv6) is an endpoint-independent mapping with that filtering, which the model already
    /// reasons about. So a pair relayed over IPv4 (symmetric NAT with random ports against a
    /// port-restricted cone) goes direct over IPv6 even behind two APDF firewalls: both sides send.
    #[test]
    fn the_traversal_model_covers_ipv6_firewalls_as_they_are() {
        use crate::nat::{FilteringBehavior as F, MappingBehavior as M};
        use crate::traversal::{udp, Path, PeerNat, Techniques};
        let t = Techniques {
            port_prediction: true,
            port_mapping: false,
        };
        let sym = PeerNat::new(M::AddressAndPortDependent, F::AddressAndPortDependent);
        let prc = PeerNat {
            predictable_ports: true,
            ..PeerNat::new(M::EndpointIndependent, F::AddressAndPortDependent)
        };
        assert_eq!(udp(sym, prc, t).path, Path::Relayed, "ipv4");
        let apdf_firewall = PeerNat::new(M::EndpointIndependent, F::AddressAndPortDependent);
        assert_eq!(
            udp(apdf_firewall, apdf_firewall, t).path,
            Path::Direct,
            "ipv6"
        );
    }

    #[test]
    fn family_choice_selects_and_refuses() {
        let a4: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let a6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let auto = FamilyChoice::Auto.select(Some(a4), Some(a6)).unwrap();
        assert_eq!((auto.ipv4, auto.ipv6), (Some(a4), Some(a6)));
        let only4 = FamilyChoice::Auto.select(Some(a4), None).unwrap();
        assert_eq!((only4.ipv4, only4.ipv6), (Some(a4), None));
        assert_eq!(
            FamilyChoice::V6.select(Some(a4), Some(a6)).unwrap().ipv4,
            None
        );
        assert!(FamilyChoice::V6.select(Some(a4), None).is_err());
        assert!(FamilyChoice::Both.select(Some(a4), None).is_err());
        assert_eq!(FamilyChoice::parse("both"), Ok(FamilyChoice::Both));
        assert!(FamilyChoice::parse("5").is_err());
    }
}
