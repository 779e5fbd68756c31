//! Topology files: a lab described in TOML (docs/lab.md, "Topology files") turned into a
//! [`Topology`], for labs the presets do not cover (two homes, nested NATs, custom knobs).
//!
//! A user edits these by hand, so every error names the file, the line and column, and the
//! problem: syntax and field errors come with toml's span; semantic errors from
//! [`Topology::plan`] (unknown parent, overlapping subnets, ...) are traced back to the line of
//! the offending node through the spans kept while reading it. A file is fully planned on load,
//! so a file that loads is a lab that can be built.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use natscope_core::nat::{FilteringBehavior, MappingBehavior, Pooling, PortAllocation};
use natscope_core::portmap::PortMappingService;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::plan::parents_first;
use crate::presets;
use crate::topology::{
    Ipv4Net, Ipv6Mode, Ipv6UnsolicitedSyn, NodeSpec, Plan, RouterKind, Topology, TopologyError,
    UnsolicitedSyn,
};

/// Where in a topology file something went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    /// 1-based line and column (in characters), when known.
    pub line_column: Option<(usize, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_column {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.file),
            None => write!(f, "{}", self.file),
        }
    }
}

/// Why a topology file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read topology file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// Syntax, unknown field, bad value, or a setting that makes no sense.
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
    /// The file is well formed but the lab it describes is not ([`Topology::plan`]).
    #[error("{at}: {error}")]
    Topology { at: Location, error: TopologyError },
}

/// Reads and validates the topology file at `path`.
pub fn load(path: &Path) -> Result<Topology, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.display().to_string(),
        error,
    })?;
    from_toml(&source, &path.display().to_string())
}

/// Reads the topology file at `path` and returns its address plan.
pub fn load_and_plan(path: &Path) -> Result<Plan, ConfigError> {
    let topology = load(path)?;
    topology.plan().map_err(|error| ConfigError::Topology {
        at: Location {
            file: path.display().to_string(),
            line_column: None,
        },
        error,
    })
}

/// Parses a topology file's text and validates it with [`Topology::plan`]. `file_name` is only
/// used in error messages.
pub fn from_toml(source: &str, file_name: &str) -> Result<Topology, ConfigError> {
    let at = |span: Option<Range<usize>>| Location {
        file: file_name.to_string(),
        line_column: span.map(|s| line_column(source, s.start)),
    };
    let doc: FileDoc = toml::from_str(source).map_err(|e| {
        let mut message = e.message().trim_end().to_string();
        if message.ends_with("expected a sequence") {
            message.push_str(" (write each node as [[reflector]], [[nat]] or [[host]])");
        }
        ConfigError::Invalid {
            at: at(e.span()),
            message,
        }
    })?;
    let (topology, spans) = build(doc).map_err(|(span, message)| ConfigError::Invalid {
        at: at(Some(span)),
        message,
    })?;
    if topology.nodes.is_empty() {
        return Err(ConfigError::Invalid {
            at: at(None),
            message: "the file defines no nodes: add [[reflector]], [[nat]] or [[host]] tables, \
                      or a preset"
                .to_string(),
        });
    }
    match topology.plan() {
        Ok(_) => Ok(topology),
        Err(error) => Err(ConfigError::Topology {
            at: at(spans.locate(&error)),
            error,
        }),
    }
}

/// 1-based line and character column of byte `offset` in `source`.
pub(crate) fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

// ---- the file format ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    preset: Option<Spanned<String>>,
    #[serde(default)]
    reflector: Vec<ReflectorDoc>,
    #[serde(default)]
    nat: Vec<NatDoc>,
    #[serde(default)]
    host: Vec<HostDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReflectorDoc {
    name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostDoc {
    name: Spanned<String>,
    parent: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NatDoc {
    name: Spanned<String>,
    parent: Option<Spanned<String>>,
    lan: Option<Spanned<LanDoc>>,
    behavior: Option<Spanned<BehaviorDoc>>,
    mapping: Option<MappingBehavior>,
    filtering: Option<FilteringBehavior>,
    allocation: Option<AllocationDoc>,
    step: Option<Spanned<u16>>,
    port_range: Option<Spanned<Vec<u16>>>,
    port_parity: Option<bool>,
    hairpinning: Option<bool>,
    udp_timeout_s: Option<u64>,
    tcp_timeout_s: Option<u64>,
    inbound_refresh: Option<bool>,
    pooling: Option<Pooling>,
    translate: Option<bool>,
    block_udp: Option<bool>,
    external_addresses: Option<u8>,
    unsolicited_syn: Option<SynDoc>,
    loss: Option<f64>,
    delay_ms: Option<u64>,
    seed: Option<u64>,
    ipv6: Option<Ipv6Mode>,
    ipv6_filtering: Option<FilteringBehavior>,
    ipv6_udp_timeout_s: Option<u64>,
    ipv6_tcp_timeout_s: Option<u64>,
    ipv6_unsolicited_syn: Option<Ipv6UnsolicitedSyn>,
    /// Port-mapping services on the router's LAN address: any of "nat-pmp", "pcp", "upnp".
    port_mapping: Option<Spanned<Vec<PortMappingService>>>,
}

impl NatDoc {
    /// Names of the engine settings this table sets (rejected for `behavior = "linux"`).
    fn engine_fields(&self) -> Vec<&'static str> {
        [
            ("mapping", self.mapping.is_some()),
            ("filtering", self.filtering.is_some()),
            ("allocation", self.allocation.is_some()),
            ("step", self.step.is_some()),
            ("port_range", self.port_range.is_some()),
            ("port_parity", self.port_parity.is_some()),
            ("hairpinning", self.hairpinning.is_some()),
            ("udp_timeout_s", self.udp_timeout_s.is_some()),
            ("tcp_timeout_s", self.tcp_timeout_s.is_some()),
            ("inbound_refresh", self.inbound_refresh.is_some()),
            ("pooling", self.pooling.is_some()),
            ("translate", self.translate.is_some()),
            ("block_udp", self.block_udp.is_some()),
            ("external_addresses", self.external_addresses.is_some()),
            ("unsolicited_syn", self.unsolicited_syn.is_some()),
            ("loss", self.loss.is_some()),
            ("delay_ms", self.delay_ms.is_some()),
            ("seed", self.seed.is_some()),
            ("ipv6", self.ipv6.is_some()),
            ("ipv6_filtering", self.ipv6_filtering.is_some()),
            ("ipv6_udp_timeout_s", self.ipv6_udp_timeout_s.is_some()),
            ("ipv6_tcp_timeout_s", self.ipv6_tcp_timeout_s.is_some()),
            ("ipv6_unsolicited_syn", self.ipv6_unsolicited_syn.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

/// A LAN prefix written as a string, `"10.1.0.0/24"`.
struct LanDoc(Ipv4Net);

impl<'de> Deserialize<'de> for LanDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(LanDoc).map_err(serde::de::Error::custom)
    }
}

/// `behavior = "<name>"`: the settings of that preset's `nat` router; any preset with one router
/// ([`presets::ROUTER_BEHAVIORS`], from the preset table).
#[derive(Clone, Copy)]
struct BehaviorDoc(&'static str);

impl<'de> Deserialize<'de> for BehaviorDoc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        presets::ROUTER_BEHAVIORS
            .iter()
            .find(|b| **b == s)
            .map(|b| Self(b))
            .ok_or_else(|| serde::de::Error::unknown_variant(&s, presets::ROUTER_BEHAVIORS))
    }
}

impl BehaviorDoc {
    fn name(self) -> &'static str {
        self.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum AllocationDoc {
    Preserve,
    Sequential,
    Random,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SynDoc {
    Drop,
    Reset,
}

// ---- building the topology ----------------------------------------------------------------

/// Byte spans of one node's fields, to point semantic errors at the right line.
struct NodeSpans {
    name: String,
    name_span: Range<usize>,
    parent: Option<Range<usize>>,
    lan: Option<Range<usize>>,
}

/// Spans of every node read from the file (preset nodes have none).
#[derive(Default)]
struct Spans(Vec<NodeSpans>);

impl Spans {
    fn of(&self, name: &str) -> Option<&NodeSpans> {
        self.0.iter().find(|n| n.name == name)
    }

    /// The span of the file location most to blame for `error`, if it came from the file.
    fn locate(&self, error: &TopologyError) -> Option<Range<usize>> {
        let name_span = |name: &str| self.of(name).map(|n| n.name_span.clone());
        let parent_span = |name: &str| {
            self.of(name)
                .and_then(|n| n.parent.clone().or(Some(n.name_span.clone())))
        };
        let lan_span = |name: &str| {
            self.of(name)
                .and_then(|n| n.lan.clone().or(Some(n.name_span.clone())))
        };
        match error {
            TopologyError::DuplicateName(name) => {
                // The later of the two definitions in the file.
                let mut spans: Vec<_> = self
                    .0
                    .iter()
                    .filter(|n| &n.name == name)
                    .map(|n| n.name_span.clone())
                    .collect();
                spans.sort_by_key(|s| s.start);
                spans.pop()
            }
            TopologyError::BadName(name) => name_span(name),
            TopologyError::UnknownParent { node, .. } => parent_span(node),
            TopologyError::Cycle(node) => parent_span(node),
            TopologyError::Overlap { a_node, b_node, .. } => {
                lan_span(a_node).or_else(|| lan_span(b_node))
            }
            TopologyError::BadSubnet { node, .. } => lan_span(node),
            TopologyError::BadNat { node, .. } => name_span(node),
            TopologyError::TooMany { .. } => None,
        }
    }
}

type BuildError = (Range<usize>, String);

fn build(doc: FileDoc) -> Result<(Topology, Spans), BuildError> {
    let mut spans = Spans::default();
    let mut nodes = Vec::new();
    let mut preset_name = None;
    if let Some(p) = &doc.preset {
        let topology = presets::preset(p.get_ref()).ok_or_else(|| {
            (
                p.span(),
                format!(
                    "unknown preset `{}`, expected one of {}",
                    p.get_ref(),
                    quoted_list(presets::names())
                ),
            )
        })?;
        preset_name = Some(p.get_ref().clone());
        nodes.extend(topology.nodes);
    }
    for r in doc.reflector {
        spans.0.push(NodeSpans {
            name: r.name.get_ref().clone(),
            name_span: r.name.span(),
            parent: None,
            lan: None,
        });
        nodes.push(NodeSpec::Reflector {
            name: r.name.into_inner(),
        });
    }
    for n in doc.nat {
        spans.0.push(NodeSpans {
            name: n.name.get_ref().clone(),
            name_span: n.name.span(),
            parent: n.parent.as_ref().map(Spanned::span),
            lan: n.lan.as_ref().map(Spanned::span),
        });
        let router = router(&n)?;
        nodes.push(NodeSpec::Nat {
            name: n.name.into_inner(),
            parent: n.parent.map(Spanned::into_inner),
            lan: n.lan.map(|l| l.into_inner().0),
            // The knob is one key: an engine router serves it itself (its `EngineConfig`, set by
            // `router`), a `linux` router runs miniupnpd for it (`crate::miniupnpd`).
            port_mapping: match router {
                RouterKind::Linux => n.port_mapping.map(Spanned::into_inner).unwrap_or_default(),
                RouterKind::Engine(_) => Vec::new(),
            },
            router,
        });
    }
    for h in doc.host {
        spans.0.push(NodeSpans {
            name: h.name.get_ref().clone(),
            name_span: h.name.span(),
            parent: h.parent.as_ref().map(Spanned::span),
            lan: None,
        });
        nodes.push(NodeSpec::Host {
            name: h.name.into_inner(),
            parent: h.parent.map(Spanned::into_inner),
        });
    }
    let order = parents_first(&nodes);
    let mut slots: Vec<Option<NodeSpec>> = nodes.into_iter().map(Some).collect();
    let nodes = order.into_iter().filter_map(|i| slots[i].take()).collect();
    Ok((
        Topology {
            preset: preset_name,
            nodes,
        },
        spans,
    ))
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The router of a `[[nat]]` table: its `behavior` (default `port-restricted-cone`), then every
/// explicit setting on top.
fn router(n: &NatDoc) -> Result<RouterKind, BuildError> {
    let behavior = n.behavior.as_ref().map(|b| (*b.get_ref(), b.span()));
    let base = behavior
        .as_ref()
        .map_or("port-restricted-cone", |(b, _)| b.name());
    let Some(RouterKind::Engine(mut cfg)) = presets::router(base) else {
        // `linux`: the kernel's masquerade has no engine settings.
        let fields = n.engine_fields();
        if let (Some(first), Some((_, span))) = (fields.first(), behavior) {
            return Err((
                span,
                format!(
                    "nat `{}`: behavior = \"linux\" is the kernel's masquerade and takes no \
                     engine settings (found `{first}`)",
                    n.name.get_ref()
                ),
            ));
        }
        return Ok(RouterKind::Linux);
    };
    let b = &mut cfg.behavior;
    if let Some(m) = n.mapping {
        b.mapping = m;
    }
    if let Some(f) = n.filtering {
        b.filtering = f;
    }
    if let Some(a) = n.allocation {
        b.allocation = match a {
            AllocationDoc::Preserve => PortAllocation::Preserve,
            AllocationDoc::Sequential => PortAllocation::Sequential { step: 1 },
            AllocationDoc::Random => PortAllocation::Random,
        };
    }
    if let Some(step) = &n.step {
        match &mut b.allocation {
            PortAllocation::Sequential { step: s } => *s = *step.get_ref(),
            _ => {
                return Err((
                    step.span(),
                    "`step` applies only to allocation = \"sequential\"".to_string(),
                ))
            }
        }
    }
    if let Some(range) = &n.port_range {
        let &[lo, hi] = range.get_ref().as_slice() else {
            return Err((
                range.span(),
                "port_range must be two ports, [low, high]".to_string(),
            ));
        };
        b.port_range = (lo, hi);
    }
    if let Some(v) = n.port_parity {
        b.port_parity = v;
    }
    if let Some(v) = n.hairpinning {
        b.hairpinning = v;
    }
    if let Some(s) = n.udp_timeout_s {
        b.udp_timeout = Duration::from_secs(s);
    }
    if let Some(s) = n.tcp_timeout_s {
        b.tcp_timeout = Duration::from_secs(s);
    }
    if let Some(v) = n.inbound_refresh {
        b.inbound_refresh = v;
    }
    if let Some(p) = n.pooling {
        b.pooling = p;
    }
    if let Some(v) = n.translate {
        cfg.translate = v;
    }
    if let Some(v) = n.block_udp {
        cfg.block_udp = v;
    }
    if let Some(v) = n.external_addresses {
        cfg.external_addresses = v;
    }
    if let Some(s) = n.unsolicited_syn {
        cfg.unsolicited_syn = match s {
            SynDoc::Drop => UnsolicitedSyn::Drop,
            SynDoc::Reset => UnsolicitedSyn::Reset,
        };
    }
    if let Some(v) = n.loss {
        cfg.loss = v;
    }
    if let Some(ms) = n.delay_ms {
        cfg.delay = Duration::from_millis(ms);
    }
    if let Some(v) = n.seed {
        cfg.seed = v;
    }
    if let Some(v) = n.ipv6 {
        cfg.ipv6 = v;
    }
    if let Some(v) = n.ipv6_filtering {
        cfg.ipv6_filtering = v;
    }
    if let Some(s) = n.ipv6_udp_timeout_s {
        cfg.ipv6_udp_timeout = Duration::from_secs(s);
    }
    if let Some(s) = n.ipv6_tcp_timeout_s {
        cfg.ipv6_tcp_timeout = Duration::from_secs(s);
    }
    if let Some(v) = n.ipv6_unsolicited_syn {
        cfg.ipv6_unsolicited_syn = v;
    }
    if let Some(services) = &n.port_mapping {
        let mut list = services.get_ref().clone();
        list.sort();
        if list.windows(2).any(|w| w[0] == w[1]) {
            return Err((
                services.span(),
                "port_mapping names a service twice".to_string(),
            ));
        }
        if !cfg.translate && !list.is_empty() {
            return Err((
                services.span(),
                "port_mapping needs a translating nat (translate = true): a firewall has no \
                 external address to map"
                    .to_string(),
            ));
        }
        cfg.port_mapping = list;
    }
    Ok(RouterKind::Engine(cfg))
}

#[cfg(test)]
mod tests {
    use natscope_core::nat::NatBehavior;

    use super::*;
    use crate::topology::EngineConfig;

    const TWO_HOMES: &str = r#"# two homes behind one carrier
[[reflector]]
name = "stun"

[[nat]]
name = "carrier"
behavior = "full-cone"
external_addresses = 2

[[nat]]
name = "home1"
parent = "carrier"
lan = "10.1.0.0/24"

[[nat]]
name = "home2"
parent = "carrier"
behavior = "symmetric"
allocation = "sequential"
step = 2
port_range = [20000, 30000]
port_parity = true
hairpinning = true
udp_timeout_s = 30
tcp_timeout_s = 600
inbound_refresh = true
pooling = "arbitrary"
unsolicited_syn = "reset"
loss = 0.25
delay_ms = 15
seed = 7

[[host]]
name = "alice"
parent = "home1"

[[host]]
name = "bob"
parent = "home2"
"#;

    fn err(source: &str) -> String {
        match from_toml(source, "two-homes.toml") {
            Ok(t) => panic!("expected an error, got {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn valid_file_round_trips() {
        let t = from_toml(TWO_HOMES, "two-homes.toml").expect("valid");
        let mut carrier = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::EndpointIndependent,
        ));
        carrier.behavior.hairpinning = true; // from the full-cone preset
        carrier.external_addresses = 2;
        let home1 = EngineConfig::new(NatBehavior::new(
            MappingBehavior::EndpointIndependent,
            FilteringBehavior::AddressAndPortDependent,
        ));
        let mut home2 = EngineConfig::new(NatBehavior {
            mapping: MappingBehavior::AddressAndPortDependent,
            filtering: FilteringBehavior::AddressAndPortDependent,
            allocation: PortAllocation::Sequential { step: 2 },
            port_range: (20000, 30000),
            port_parity: true,
            hairpinning: true,
            udp_timeout: Duration::from_secs(30),
            tcp_timeout: Duration::from_secs(600),
            inbound_refresh: true,
            pooling: Pooling::Arbitrary,
        });
        home2.unsolicited_syn = UnsolicitedSyn::Reset;
        home2.loss = 0.25;
        home2.delay = Duration::from_millis(15);
        home2.seed = 7;
        let want = Topology {
            preset: None,
            nodes: vec![
                NodeSpec::Reflector {
                    name: "stun".into(),
                },
                NodeSpec::Nat {
                    name: "carrier".into(),
                    parent: None,
                    lan: None,
                    router: RouterKind::Engine(carrier),
                    port_mapping: Vec::new(),
                },
                NodeSpec::Nat {
                    name: "home1".into(),
                    parent: Some("carrier".into()),
                    lan: Some(Ipv4Net::new([10, 1, 0, 0].into(), 24)),
                    router: RouterKind::Engine(home1),
                    port_mapping: Vec::new(),
                },
                NodeSpec::Nat {
                    name: "home2".into(),
                    parent: Some("carrier".into()),
                    lan: None,
                    router: RouterKind::Engine(home2),
                    port_mapping: Vec::new(),
                },
                NodeSpec::Host {
                    name: "alice".into(),
                    parent: Some("home1".into()),
                },
                NodeSpec::Host {
                    name: "bob".into(),
                    parent: Some("home2".into()),
                },
            ],
        };
        assert_eq!(t, want);
    }

    #[test]
    fn preset_start_linux_behavior_and_parents_first() {
        let src = r#"
preset = "cgnat"
[[host]]
name = "h3"
parent = "deep"
[[nat]]
name = "deep"
parent = "nat"
[[nat]]
name = "kernel"
behavior = "linux"
"#;
        let t = from_toml(src, "x.toml").expect("valid");
        assert_eq!(t.preset.as_deref(), Some("cgnat"));
        let names: Vec<&str> = t.nodes.iter().map(NodeSpec::name).collect();
        assert_eq!(
            names,
            ["stun", "carrier", "nat", "h1", "h2", "deep", "kernel", "h3"]
        );
        assert!(t.nodes.iter().any(|n| matches!(
            n,
            NodeSpec::Nat { name, router: RouterKind::Linux, .. } if name == "kernel"
        )));
        let plan = t.plan().expect("plans");
        assert_eq!(plan.nodes.len(), 9);
    }

    #[test]
    fn syntax_error_has_line() {
        let e = err("[[reflector]]\nname = \"stun\"\n\n[[nat]\nname = \"x\"\n");
        assert!(e.starts_with("two-homes.toml:4:"), "{e}");
    }

    #[test]
    fn unknown_field_has_line_and_column() {
        let src = "[[reflector]]\nname = \"stun\"\n\n[[nat]]\nname = \"n\"\nmapping = \"endpoint-independent\"\n      filterin = \"address-dependent\"\n";
        let e = err(src);
        assert!(e.starts_with("two-homes.toml:7:7: "), "{e}");
        assert!(e.contains("unknown field `filterin`"), "{e}");
        assert!(e.contains("expected one of"), "{e}");
    }

    #[test]
    fn bad_enum_value_has_line() {
        let src = "[[nat]]\nname = \"n\"\nfiltering = \"sometimes\"\n";
        let e = err(src);
        assert!(e.starts_with("two-homes.toml:3:"), "{e}");
        assert!(e.contains("sometimes"), "{e}");
        assert!(e.contains("address-and-port-dependent"), "{e}");
        let e = err("[[nat]]\nname = \"n\"\nbehavior = \"cone\"\n");
        assert!(e.starts_with("two-homes.toml:3:"), "{e}");
        assert!(e.contains("cone") && e.contains("full-cone"), "{e}");
    }

    #[test]
    fn ipv6_knobs_are_read_and_bad_values_located() {
        let src =
            "[[nat]]\nname = \"n\"\nipv6 = \"nptv6\"\nipv6_filtering = \"address-dependent\"\n\
                   ipv6_udp_timeout_s = 600\nipv6_tcp_timeout_s = 9000\n\
                   ipv6_unsolicited_syn = \"admin-prohibited\"\n";
        let t = from_toml(src, "two-homes.toml").expect("valid");
        let Some(NodeSpec::Nat {
            router: RouterKind::Engine(cfg),
            ..
        }) = t.nodes.first()
        else {
            panic!("a nat");
        };
        assert_eq!(cfg.ipv6, Ipv6Mode::Nptv6);
        assert_eq!(cfg.ipv6_filtering, FilteringBehavior::AddressDependent);
        assert_eq!(cfg.ipv6_udp_timeout, Duration::from_secs(600));
        assert_eq!(cfg.ipv6_tcp_timeout, Duration::from_secs(9000));
        assert_eq!(
            cfg.ipv6_unsolicited_syn,
            Ipv6UnsolicitedSyn::AdminProhibited
        );

        let e = err("[[nat]]\nname = \"n\"\n  ipv6 = \"nat64\"\n");
        assert!(e.starts_with("two-homes.toml:3:"), "{e}");
        assert!(e.contains("nat64") && e.contains("nptv6"), "{e}");
        let e = err("[[nat]]\nname = \"n\"\nipv6_unsolicited_syn = \"reset\"\n");
        assert!(e.starts_with("two-homes.toml:3:"), "{e}");
        assert!(e.contains("admin-prohibited"), "{e}");
        // RFC 6092's minimum timers are enforced.
        let e = err("[[nat]]\nname = \"n\"\nipv6_udp_timeout_s = 60\n");
        assert!(e.contains("ipv6_udp_timeout must be at least 2 min"), "{e}");
        let e = err("[[nat]]\nname = \"n\"\nbehavior = \"linux\"\nipv6 = \"none\"\n");
        assert!(e.contains("takes no engine settings (found `ipv6`)"), "{e}");
    }

    #[test]
    fn bad_subnet_string_has_line() {
        let src = "[[nat]]\nname = \"n\"\n\nlan = \"10.1.0/24\"\n";
        let e = err(src);
        assert!(e.starts_with("two-homes.toml:4:"), "{e}");
        assert!(e.contains("not an IPv4 address"), "{e}");
        let e = err("[[nat]]\nname = \"n\"\nlan = \"10.1.0.0/33\"\n");
        assert!(e.starts_with("two-homes.toml:3:"), "{e}");
        assert!(e.contains("prefix length"), "{e}");
    }

    #[test]
    fn unknown_parent_points_at_the_parent_line() {
        let src = "[[nat]]\nname = \"home\"\n\n[[host]]\nname = \"alice\"\nparent = \"hme\"\n";
        let e = err(src);
        assert_eq!(
            e,
            "two-homes.toml:6:10: node `alice` sits behind `hme`, which is not a nat node of \
             this lab"
        );
    }

    #[test]
    fn overlapping_subnets_point_at_the_second_lan() {
        let src = "[[nat]]\nname = \"a\"\nlan = \"10.0.0.0/16\"\n[[nat]]\nname = \"b\"\nlan = \"10.0.9.0/24\"\n";
        let e = err(src);
        assert!(e.starts_with("two-homes.toml:6:7: "), "{e}");
        assert!(e.contains("overlaps 10.0.0.0/16 of `a`"), "{e}");
    }

    #[test]
    fn other_semantic_errors_are_located() {
        let e = err("[[host]]\nname = \"x\"\n[[host]]\nname = \"x\"\n");
        assert!(
            e.starts_with("two-homes.toml:4:8: node name `x` is used twice"),
            "{e}"
        );
        let e = err("[[nat]]\nname = \"n\"\nloss = 2.0\n");
        assert!(e.starts_with("two-homes.toml:2:8: nat `n`: loss"), "{e}");
        let e = err("[[nat]]\nname = \"n\"\nstep = 3\n");
        assert!(
            e.starts_with("two-homes.toml:3:8: `step` applies only"),
            "{e}"
        );
        let e = err("[[nat]]\nname = \"n\"\nbehavior = \"linux\"\nloss = 0.1\n");
        assert!(e.starts_with("two-homes.toml:3:12: "), "{e}");
        assert!(e.contains("found `loss`"), "{e}");
        let e = err("preset = \"nope\"\n");
        assert!(
            e.starts_with("two-homes.toml:1:10: unknown preset `nope`"),
            "{e}"
        );
        let e = err("[host]\nname = \"x\"\n");
        assert!(e.contains("(write each node as [[reflector]]"), "{e}");
        let e = err("# nothing\n");
        assert!(
            e.starts_with("two-homes.toml: the file defines no nodes"),
            "{e}"
        );
        let e = err("[[nat]]\nname = \"n\"\nport_range = [1, 2, 3]\n");
        assert!(
            e.starts_with("two-homes.toml:3:14: port_range must be two ports"),
            "{e}"
        );
        let e = err("[[nat]]\nname = \"n\"\nexternal_addresses = 300\n");
        assert!(e.starts_with("two-homes.toml:3:22: "), "{e}");
    }

    #[test]
    fn unreadable_file_names_path() {
        let e = load(Path::new("/nonexistent/lab.toml")).expect_err("missing");
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot read topology file /nonexistent/lab.toml: "),
            "{msg}"
        );
    }

    #[test]
    fn example_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                load_and_plan(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 1);
    }

    #[test]
    fn port_mapping_knob_reads_services_and_locates_bad_words() {
        let t = from_toml(
            "[[nat]]\nname = \"n\"\nbehavior = \"symmetric\"\nport_mapping = [\"upnp\", \"nat-pmp\"]\n",
            "two-homes.toml",
        )
        .expect("loads");
        let Some(NodeSpec::Nat {
            router: RouterKind::Engine(cfg),
            ..
        }) = t.nodes.first()
        else {
            panic!("no engine nat: {t:?}");
        };
        assert_eq!(
            cfg.port_mapping,
            [PortMappingService::NatPmp, PortMappingService::Upnp]
        );
        let e = err("[[nat]]\nname = \"n\"\nport_mapping = [\"pcp\", \"natpmp\"]\n");
        assert!(e.starts_with("two-homes.toml:3:24: "), "{e}");
        assert!(e.contains("natpmp") && e.contains("nat-pmp"), "{e}");
        let e = err("[[nat]]\nname = \"n\"\nport_mapping = [\"pcp\", \"pcp\"]\n");
        assert!(e.starts_with("two-homes.toml:3:16: "), "{e}");
        assert!(e.contains("twice"), "{e}");
        // A `linux` router takes the knob too, through miniupnpd, with miniupnpd's limits.
        let e = err("[[nat]]\nname = \"n\"\nbehavior = \"linux\"\nport_mapping = [\"pcp\"]\n");
        assert!(
            e.contains("miniupnpd") && e.contains("both or neither"),
            "{e}"
        );
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncé d", 7), (2, 4));
        assert_eq!(line_column("ab", 99), (1, 3));
        assert_eq!(line_column("é", 1), (1, 1));
    }
}
