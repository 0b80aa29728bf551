//! Which contract a plugin was built for, and which of its functions
//! differ from the host's: what makes a refusal say both sides.
//!
//! # Invariant
//! A plugin refused for its contract is refused with both versions (the
//! one it was built for, the one the host speaks), or with the function
//! whose signature differs and both signatures. Only the refusal's path
//! runs this but the signature check, a few type comparisons at load.

use wasmtime::Engine;
use wasmtime::component::types::{ComponentItem, Type};
use wasmtime::component::{Component, ComponentNamedList, Lift, Lower};

use super::bindings::embedhost::embedder::types::{
    EmbedError, Embeddings, HealthReport, InputKind, ModelInfo,
};

/// The contract this host speaks: the package and version of `wit/`.
pub const HOST_CONTRACT: &str = "embedhost:embedder@0.1.0";

/// The package every interface of the contract is in.
const PACKAGE: &str = "embedhost:embedder/";

/// Each function of the exported interface as `wit/embedder.wit` writes it.
const HOST_FUNCTIONS: &[(&str, &str)] = &[
    (
        "init",
        "func(config: list<tuple<string, string>>) -> result<model-info, embed-error>",
    ),
    (
        "embed",
        "func(texts: list<string>, kind: input-kind) -> result<embeddings, embed-error>",
    ),
    ("health", "func() -> health-report"),
];

/// Why a plugin does not fit the host's contract.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// Built for another version of the contract.
    #[error("it was built for contract {plugin}; this host speaks {host}")]
    Version {
        /// The plugin's contract, as `embedhost:embedder@X.Y.Z`.
        plugin: String,
        /// [`HOST_CONTRACT`].
        host: &'static str,
    },
    /// A function of the exported interface has another signature.
    #[error(
        "its `{function}` is `{plugin}`, but contract {host_contract} (this host's) has `{host}`"
    )]
    Signature {
        /// The function.
        function: &'static str,
        /// Its signature in the plugin.
        plugin: String,
        /// Its signature in the contract.
        host: &'static str,
        /// [`HOST_CONTRACT`].
        host_contract: &'static str,
    },
}

/// The contract `component` was built for, if it names one of another
/// version than the host's (in any of its imports or exports).
pub fn other_version(engine: &Engine, component: &Component) -> Option<ContractError> {
    let ty = component.component_type();
    let names: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .chain(ty.exports(engine).map(|(name, _)| name.to_string()))
        .collect();
    let host_version = HOST_CONTRACT.rsplit_once('@').map(|(_, v)| v)?;
    names.iter().find_map(|name| {
        let rest = name.strip_prefix(PACKAGE)?;
        let (_, version) = rest.split_once('@')?;
        (version != host_version).then(|| ContractError::Version {
            plugin: format!("{}@{version}", PACKAGE.trim_end_matches('/')),
            host: HOST_CONTRACT,
        })
    })
}

/// The first function of the exported interface whose signature differs
/// from the contract's.
pub fn differing_signature(engine: &Engine, component: &Component) -> Option<ContractError> {
    let ty = component.component_type();
    let cx = ty.instance_type();
    let ComponentItem::ComponentInstance(interface) =
        ty.get_export(engine, super::EXPORTED_INTERFACE)?.ty
    else {
        return None;
    };
    for &(function, host) in HOST_FUNCTIONS {
        let Some(ComponentItem::ComponentFunc(func)) =
            interface.get_export(engine, function).map(|e| e.ty)
        else {
            continue;
        };
        let fits = match function {
            "init" => {
                check::<(Vec<(String, String)>,), (Result<ModelInfo, EmbedError>,)>(&func, &cx)
            }
            "embed" => {
                check::<(Vec<String>, InputKind), (Result<Embeddings, EmbedError>,)>(&func, &cx)
            }
            _ => check::<(), (HealthReport,)>(&func, &cx),
        };
        if !fits {
            let params: Vec<String> = func
                .params()
                .map(|(name, ty)| format!("{name}: {}", show(&ty)))
                .collect();
            let results: Vec<String> = func.results().map(|ty| show(&ty)).collect();
            let arrow = if results.is_empty() {
                String::new()
            } else {
                format!(" -> {}", results.join(", "))
            };
            return Some(ContractError::Signature {
                function,
                plugin: format!("func({}){arrow}", params.join(", ")),
                host,
                host_contract: HOST_CONTRACT,
            });
        }
    }
    None
}

fn check<P, R>(
    func: &wasmtime::component::types::ComponentFunc,
    cx: &wasmtime::component::__internal::InstanceType<'_>,
) -> bool
where
    P: ComponentNamedList + Lower,
    R: ComponentNamedList + Lift,
{
    func.typecheck::<P, R>(cx).is_ok()
}

/// A type, as WIT would write it (records and variants by their shape).
fn show(ty: &Type) -> String {
    let list = |types: Vec<String>| types.join(", ");
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(l) => format!("list<{}>", show(&l.ty())),
        Type::Record(r) => format!(
            "record {{ {} }}",
            list(
                r.fields()
                    .map(|f| format!("{}: {}", f.name, show(&f.ty)))
                    .collect()
            )
        ),
        Type::Tuple(t) => format!("tuple<{}>", list(t.types().map(|t| show(&t)).collect())),
        Type::Variant(v) => format!(
            "variant {{ {} }}",
            list(
                v.cases()
                    .map(|c| match c.ty {
                        Some(t) => format!("{}({})", c.name, show(&t)),
                        None => c.name.to_string(),
                    })
                    .collect()
            )
        ),
        Type::Enum(e) => format!(
            "enum {{ {} }}",
            list(e.names().map(str::to_string).collect())
        ),
        Type::Option(o) => format!("option<{}>", show(&o.ty())),
        Type::Result(r) => {
            let side = |t: Option<Type>| t.map_or("_".to_string(), |t| show(&t));
            format!("result<{}, {}>", side(r.ok()), side(r.err()))
        }
        Type::Flags(f) => format!(
            "flags {{ {} }}",
            list(f.names().map(str::to_string).collect())
        ),
        other => format!("{other:?}"),
    }
}
