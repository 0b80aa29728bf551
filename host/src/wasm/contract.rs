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
pub const HOST_CONTRACT: &str = "embedhost:embedder@0.1.1";

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

/// The contract `component` was built for, if it is one this host may not
/// run: of another line (`0.1.x` against `0.2.x`; for 0.x the minor is the
/// line) or newer than the host's (in any of its imports or exports). Read
/// only when linking fails, to say why with both versions: a plugin of the
/// host's line whose imports link runs, an earlier version's always (see
/// `wit/embedder.wit`'s versioning; wasmtime links semver-compatible names).
pub fn other_version(engine: &Engine, component: &Component) -> Option<ContractError> {
    let host = parse(host_version())?;
    built_for(engine, component)
        .into_iter()
        .find(|version| parse(version).is_none_or(|v| line(v) != line(host) || v > host))
        .map(|version| ContractError::Version {
            plugin: format!("{}@{version}", PACKAGE.trim_end_matches('/')),
            host: HOST_CONTRACT,
        })
}

/// The version of the contract `component` names in its imports and
/// exports, if it names one other than the host's (the first, as written):
/// what `plugin check` shows beside the host's when the two differ.
pub fn plugin_version(engine: &Engine, component: &Component) -> Option<String> {
    built_for(engine, component)
        .into_iter()
        .find(|v| v != host_version())
}

/// The host's version of the contract, as `0.1.1`.
pub fn host_version() -> &'static str {
    HOST_CONTRACT.rsplit_once('@').map_or("", |(_, v)| v)
}

/// Every version of the contract's package that `component` names.
fn built_for(engine: &Engine, component: &Component) -> Vec<String> {
    let ty = component.component_type();
    ty.imports(engine)
        .map(|(name, _)| name.to_string())
        .chain(ty.exports(engine).map(|(name, _)| name.to_string()))
        .filter_map(|name| {
            let rest = name.strip_prefix(PACKAGE)?;
            Some(rest.split_once('@')?.1.to_string())
        })
        .collect()
}

/// `major.minor.patch`, if `version` is that (pre-releases are not).
fn parse(version: &str) -> Option<(u64, u64, u64)> {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// The semver line: the major, or for 0.x the minor too.
fn line((major, minor, _): (u64, u64, u64)) -> (u64, u64) {
    (major, if major == 0 { minor } else { 0 })
}

/// The first function of the exported interface whose signature differs
/// from the contract's (the interface at any version of the contract: the
/// functions of every version of the `0.1` line are the same).
pub fn differing_signature(engine: &Engine, component: &Component) -> Option<ContractError> {
    let ty = component.component_type();
    let cx = ty.instance_type();
    let exported = super::EXPORTED_INTERFACE
        .split_once('@')
        .map_or(super::EXPORTED_INTERFACE, |(name, _)| name);
    let ComponentItem::ComponentInstance(interface) = ty
        .exports(engine)
        .find(|(name, _)| name.split_once('@').is_some_and(|(n, _)| n == exported))?
        .1
        .ty
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

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    fn component(engine: &Engine, wat: &str) -> Component {
        Component::new(engine, wat::parse_str(wat).unwrap()).unwrap()
    }

    /// The refusal of a plugin whose `embed` takes every kind of value
    /// spells its signature as WIT would, kind by kind (and the missing
    /// `init` is skipped, not reported).
    #[test]
    fn a_differing_signature_is_shown_as_wit_writes_every_kind_of_type() {
        let engine = engine();
        let wat = r#"(component
            (core module $m
                (memory (export "mem") 1)
                (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 0)
                (func (export "f") (param i32 i32 i32 i32) (result i32) i32.const 0))
            (core instance $i (instantiate $m))
            (type $rec (record
                (field "a" bool) (field "b" s8) (field "c" u8) (field "d" s16)
                (field "e" u16) (field "f" s32) (field "g" u32) (field "h" s64)
                (field "i" u64) (field "j" f32) (field "k" f64) (field "l" char)
                (field "m" string)))
            (export $rec2 "rec" (type $rec))
            (type $var (variant (case "none") (case "some" u32)))
            (export $var2 "var" (type $var))
            (type $en (enum "x" "y"))
            (export $en2 "en" (type $en))
            (type $fl (flags "p" "q"))
            (export $fl2 "fl" (type $fl))
            (type $ft (func
                (param "a" (list $rec2))
                (param "b" (list (tuple $var2 $en2 $fl2 (option string) (result) (result u32 (error string)))))
                (result u32)))
            (func $f (type $ft) (canon lift (core func $i "f") (memory (core memory $i "mem")) (realloc (core func $i "realloc"))))
            (instance $e (export "embed" (func $f)))
            (export "embedhost:embedder/embedder@0.1.0" (instance $e)))"#;
        let err = differing_signature(&engine, &component(&engine, wat)).expect("a refusal");
        let ContractError::Signature {
            function,
            plugin,
            host,
            host_contract,
        } = &err
        else {
            panic!("not a signature refusal: {err:?}");
        };
        assert_eq!(*function, "embed");
        assert_eq!(*host, HOST_FUNCTIONS[1].1);
        assert_eq!(*host_contract, HOST_CONTRACT);
        assert_eq!(
            plugin,
            "func(a: list<record { a: bool, b: s8, c: u8, d: s16, e: u16, f: s32, g: u32, h: s64, i: u64, j: f32, k: f64, l: char, m: string }>, \
             b: list<tuple<variant { none, some(u32) }, enum { x, y }, flags { p, q }, option<string>, result<_, _>, result<u32, string>>>) -> u32"
        );
        let text = err.to_string();
        assert!(
            text.contains("`embed`") && text.contains(HOST_CONTRACT) && text.contains(host),
            "{text}"
        );
    }

    /// A function with no result shows none (no dangling arrow), and the
    /// functions the plugin lacks are not what its refusal names.
    #[test]
    fn a_function_without_a_result_is_shown_without_an_arrow() {
        let engine = engine();
        let wat = r#"(component
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            (func $f (canon lift (core func $i "f")))
            (instance $e (export "health" (func $f)))
            (export "embedhost:embedder/embedder@0.1.0" (instance $e)))"#;
        let err = differing_signature(&engine, &component(&engine, wat));
        assert_eq!(
            err,
            Some(ContractError::Signature {
                function: "health",
                plugin: "func()".into(),
                host: "func() -> health-report",
                host_contract: HOST_CONTRACT,
            })
        );
    }

    /// The interface's name exported as a function is not an interface
    /// whose signatures could differ (the missing export is refused
    /// elsewhere, by the bindings).
    #[test]
    fn an_interface_name_exported_as_a_function_has_no_signature_to_compare() {
        let engine = engine();
        let wat = r#"(component
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            (func $f (canon lift (core func $i "f")))
            (export "embedhost:embedder/embedder@0.1.0" (func $f)))"#;
        let component = component(&engine, wat);
        assert_eq!(differing_signature(&engine, &component), None);
        assert_eq!(other_version(&engine, &component), None);
    }

    /// An earlier version of the host's line is not "another version"; a
    /// newer one or another line is, named with the host's (what a refusal
    /// says when linking fails).
    #[test]
    fn versions_are_read_as_semver_lines() {
        let engine = engine();
        let exporting = |version: &str| {
            component(
                &engine,
                &format!(
                    r#"(component
                        (core module $m (func (export "f")))
                        (core instance $i (instantiate $m))
                        (func $f (canon lift (core func $i "f")))
                        (instance $e (export "health" (func $f)))
                        (export "embedhost:embedder/embedder@{version}" (instance $e)))"#
                ),
            )
        };
        assert_eq!(other_version(&engine, &exporting("0.1.0")), None);
        assert_eq!(other_version(&engine, &exporting(host_version())), None);
        assert_eq!(
            plugin_version(&engine, &exporting("0.1.0")).as_deref(),
            Some("0.1.0")
        );
        assert_eq!(plugin_version(&engine, &exporting(host_version())), None);
        for other in ["0.1.9", "0.2.0", "1.1.0", "0.1.0-rc1"] {
            assert_eq!(
                other_version(&engine, &exporting(other)),
                Some(ContractError::Version {
                    plugin: format!("embedhost:embedder@{other}"),
                    host: HOST_CONTRACT,
                }),
                "{other}"
            );
        }
    }
}
