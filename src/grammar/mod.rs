//! What rules and lists name, each by its own grammar, parsed once: identity patterns
//! ([`pattern`]: SPIFFE IDs by segment, DNS names by label) and calls ([`methods`]:
//! `pkg.Service/Method`, `VERB /path` at `/` boundaries). A leaf: the config model,
//! the policy, limits, the registry and identities read it; it reads only `request`.

pub mod methods;
pub mod pattern;

pub use methods::{Call, MethodRule};
pub use pattern::Pattern;

/// What a rule allows of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Methods {
    All,
    Some(Vec<MethodRule>),
}

impl Methods {
    /// Compiles method entries (checked by `config`); an empty list is every method.
    /// An entry that does not compile allows nothing.
    pub fn compile(list: &[String]) -> Self {
        if list.is_empty() {
            return Methods::All;
        }
        Methods::Some(
            list.iter()
                .filter_map(|m| MethodRule::parse(m).ok())
                .collect(),
        )
    }

    /// Adds what `other` allows.
    pub fn merge(&mut self, other: &Methods) {
        match (self as &mut Methods, other) {
            (Methods::All, _) => {}
            (s, Methods::All) => *s = Methods::All,
            (Methods::Some(a), Methods::Some(b)) => a.extend(b.iter().cloned()),
        }
    }

    /// Whether `call` is allowed.
    pub fn allows(&self, call: Call<'_>) -> bool {
        match self {
            Methods::All => true,
            Methods::Some(list) => list.iter().any(|m| m.allows(call)),
        }
    }
}
