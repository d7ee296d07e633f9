//! The engine, and modules: turning bytes a tenant sent into a validated, compiled, linked
//! module, once per content hash.
//!
//! Modules are always compiled here from wasm (or WAT, converted to wasm first); precompiled
//! native code is never accepted. A module must follow the guest ABI (`docs/service-abi.md`):
//! its imports must all be granted, and its exports must have the documented types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::{
    Config, Enabled, Engine, ExternType, FuncType, InstanceAllocationStrategy, InstancePre, Linker, Module, OptLevel,
    PoolingAllocationConfig, ValType,
};

use super::error::InvalidModule;
use super::instance::{Host, link_host_functions};

/// Host functions a service may import, all in module `solo`. Imports are deny-by-default:
/// anything else fails the deploy.
pub const GRANTED_IMPORTS: [&str; 2] = ["solo.log", "solo.now_ms"];

/// How the engine is built. All of it is fixed at startup.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Instances that may exist at once (pool slots); also bounds concurrent calls.
    pub max_instances: u32,
    /// The largest linear memory any service may have (sizes each pool slot).
    pub max_memory_bytes: u64,
    /// Wasm stack per call; deeper recursion traps with `stack_overflow`.
    pub max_wasm_stack: usize,
    /// Period of the epoch that enforces CPU deadlines and lets looping guests yield.
    pub epoch_tick: Duration,
    /// The largest function body a module may have: compiling one takes memory in proportion
    /// to its size (about a gigabyte per megabyte of code), so a larger one is refused first.
    pub max_function_bytes: usize,
    /// The most functions a module may define: each takes memory and time to compile (about
    /// 6 KiB and 30 µs, even an empty one), so a module of a million tiny ones took gigabytes.
    pub max_functions: usize,
    /// The most locals a module's functions may declare, all together: each takes time to
    /// compile (about 70 ns), and a few bytes declare thousands.
    pub max_locals: u64,
    /// The most instructions a module's functions may hold inside loops, each counted once for
    /// every loop around it: compiling with CPU limits takes time in proportion (about 50 ns
    /// each), so nested loops make it quadratic in their depth.
    pub max_looped_instructions: u64,
}

/// A module ready to instantiate: validated, compiled and linked.
#[derive(Clone)]
pub struct Prepared {
    pub sha256: [u8; 32],
    pub pre: InstancePre<Host>,
    pub has_init: bool,
    pub has_stop: bool,
    /// The size the module's memory starts at: a service limited below it cannot start.
    pub min_memory_bytes: u64,
    /// Memory its compiled code takes, which the cache counts.
    pub code_bytes: usize,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("sha256", &hex::encode(self.sha256))
            .finish_non_exhaustive()
    }
}

/// Bytes of each freed memory and table slot reset in place rather than released.
const KEEP_RESIDENT_BYTES: usize = 64 << 10;

pub fn build_engine(options: &EngineOptions) -> anyhow::Result<Engine> {
    let mut pool = PoolingAllocationConfig::new();
    let slots = options.max_instances.max(1);
    let memory_slot = usize::try_from(options.max_memory_bytes.next_multiple_of(1 << 16)).unwrap_or(usize::MAX);
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots)
        .total_stacks(slots)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .max_memory_size(memory_slot)
        // A fresh instance always starts from zeroed memory. The first page of a freed slot is
        // zeroed with memset and stays resident; the rest is given back with madvise, whose
        // TLB shootdown costs every core more than a 64 KiB memset.
        .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
        .table_keep_resident(KEEP_RESIDENT_BYTES)
        // Where Linux has PAGEMAP_SCAN (6.7+), only the pages the guest wrote are zeroed.
        .pagemap_scan(Enabled::Auto)
        .max_unused_warm_slots(slots.min(100));
    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        // Each memory reserves only what its service may use (plus a guard), so thousands of
        // instances fit in the address space; bounds are checked explicitly.
        .memory_reservation(options.max_memory_bytes)
        .memory_guard_size(1 << 16)
        .memory_reservation_for_growth(0)
        .epoch_interruption(true)
        // The features a service may use are named here, not left to wasmtime's defaults:
        // refused at validation, each says which one it is. Relaxed SIMD gives the same
        // results on every host, as a service that moves with its node must.
        .wasm_features(wasmtime::WasmFeatures::THREADS, false)
        .wasm_multi_memory(false)
        .wasm_memory64(false)
        .wasm_wide_arithmetic(false)
        .relaxed_simd_deterministic(true)
        .max_wasm_stack(options.max_wasm_stack)
        .async_stack_size(options.max_wasm_stack + (256 << 10))
        .cranelift_opt_level(OptLevel::Speed);
    // The pool is reserved here, all at once: a system that cannot map it refuses now.
    Engine::new(&config).map_err(|e| {
        anyhow::anyhow!(
            "cannot build the wasm engine, which reserves the instance pool of runtime.max_instances = \
             {slots} up front: {e:#}. Each instance takes a memory slot and a stack with guard pages; \
             lower runtime.max_instances (or, on Linux, raise vm.max_map_count, the memory mappings a \
             process may hold)"
        )
    })
}

/// The first bytes of every binary wasm module.
pub const WASM_MAGIC: &[u8] = b"\0asm";

/// Converts WAT text to wasm; wasm passes through. Errors say what is wrong with the input.
pub fn to_wasm(bytes: &[u8]) -> Result<Vec<u8>, InvalidModule> {
    if bytes.starts_with(WASM_MAGIC) {
        return Ok(bytes.to_vec());
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| InvalidModule("the module is neither wasm (no \\0asm header) nor WAT text (not UTF-8)".into()))?;
    // Editors on Windows start UTF-8 files with a byte order mark, which is no WAT token.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(InvalidModule(
            "the module is empty: send a wasm binary, or WAT text such as (module ...)".into(),
        ));
    }
    wat::parse_str(text).map_err(|e| InvalidModule(format!("WAT syntax error: {e}")))
}

/// Compiles and checks a module against the guest ABI.
pub fn prepare(compiler: &Compiler, sha256: [u8; 32], wasm: &[u8]) -> Result<Prepared, InvalidModule> {
    check_code(wasm, &compiler.limits)?;
    let engine = &compiler.engine;
    let module = Module::from_binary(engine, wasm).map_err(|e| {
        // Valid wasm that this node cannot load (a memory larger than its instances may have)
        // is told apart from broken bytes; checked only on failure, as it validates again.
        if Module::validate(engine, wasm).is_ok() {
            InvalidModule(format!("the module is valid wasm, but over this node's limits: {e:#}"))
        } else {
            InvalidModule(format!("not valid wasm: {e:#}"))
        }
    })?;
    check_imports(&module)?;
    check_export(&module, "memory", None)?;
    check_export(&module, "solo_alloc", Some((&[ValType::I32], &[ValType::I32])))?;
    check_export(
        &module,
        "solo_handle",
        Some((&[ValType::I32, ValType::I32], &[ValType::I64])),
    )?;
    let has_init = optional_export(&module, "solo_init", (&[], &[ValType::I32]))?;
    let has_stop = optional_export(&module, "solo_stop", (&[], &[]))?;
    let min_memory_bytes = match module.get_export("memory") {
        Some(ExternType::Memory(memory)) => memory.minimum().saturating_mul(memory.page_size()),
        _ => 0,
    };
    let code_bytes = module.image_range().end.addr() - module.image_range().start.addr();
    let pre = compiler
        .linker
        .instantiate_pre(&module)
        .map_err(|e| InvalidModule(format!("cannot link the module: {e:#}")))?;
    Ok(Prepared {
        sha256,
        pre,
        has_init,
        has_stop,
        min_memory_bytes,
        code_bytes,
    })
}

/// The functions a module defines (its code section's count), read from the section headers
/// alone; 0 if the bytes do not parse that far.
pub fn function_count(wasm: &[u8]) -> usize {
    let mut sections = wasmparser::Parser::new(0).parse_all(wasm).map_while(Result::ok);
    sections
        .find_map(|payload| match payload {
            wasmparser::Payload::CodeSectionStart { count, .. } => Some(count as usize),
            _ => None,
        })
        .unwrap_or(0)
}

/// What a module's code may cost to compile, checked before it is: each limit bounds what
/// some cheap-to-send construct costs the compiler.
#[derive(Debug, Clone, Copy)]
pub struct CodeLimits {
    pub function_bytes: usize,
    pub functions: usize,
    pub locals: u64,
    pub looped_instructions: u64,
}

/// Refuses a module whose code is over one of `limits`, before it is compiled, by reading its
/// code section. Bytes that do not parse are left to the validation that follows, which says
/// what is wrong.
fn check_code(wasm: &[u8], limits: &CodeLimits) -> Result<(), InvalidModule> {
    let (mut index, mut locals, mut looped) = (0, 0u64, 0u64);
    for payload in wasmparser::Parser::new(0).parse_all(wasm).map_while(Result::ok) {
        let body = match payload {
            wasmparser::Payload::CodeSectionStart { count, .. } if count as usize > limits.functions => {
                return Err(InvalidModule(format!(
                    "the module defines {count} functions, over this node's limit of {} \
                     ([runtime] max_functions): each takes memory and time to compile; merge or drop some",
                    limits.functions
                )));
            }
            wasmparser::Payload::CodeSectionEntry(body) => body,
            _ => continue,
        };
        let size = body.range().len();
        if size > limits.function_bytes {
            return Err(InvalidModule(format!(
                "a function body of the module (entry {index} of its code section) is {size} bytes of code, over \
                 this node's limit of {} bytes ([runtime] max_function_bytes): compiling it would take \
                 memory in proportion; split it",
                limits.function_bytes
            )));
        }
        locals += declared_locals(&body);
        if locals > limits.locals {
            return Err(InvalidModule(format!(
                "the module's functions declare more than {} locals, this node's limit ([runtime] max_locals), \
                 by entry {index} of its code section: each takes time to compile; reuse locals",
                limits.locals
            )));
        }
        looped += looped_instructions(&body);
        if looped > limits.looped_instructions {
            return Err(InvalidModule(format!(
                "the module's functions hold more than {} instructions inside loops, each counted once for every \
                 loop around it, this node's limit ([runtime] max_looped_instructions), by entry {index} of its \
                 code section: compiling takes time in proportion, so deeply nested loops take very long; \
                 nest fewer",
                limits.looped_instructions
            )));
        }
        index += 1;
    }
    Ok(())
}

/// The locals a function body declares (its parameters aside); 0 for a list that does not parse.
fn declared_locals(body: &wasmparser::FunctionBody<'_>) -> u64 {
    let Ok(reader) = body.get_locals_reader() else { return 0 };
    reader
        .into_iter()
        .map_while(Result::ok)
        .map(|(count, _)| u64::from(count))
        .sum()
}

/// A function body's instructions, each counted once for every loop that encloses it (what
/// compiling a loop costs is in proportion to what it holds); up to where it stops parsing.
fn looped_instructions(body: &wasmparser::FunctionBody<'_>) -> u64 {
    use wasmparser::Operator;
    let Ok(mut reader) = body.get_operators_reader() else {
        return 0;
    };
    // Whether each open block is a loop, and how many are.
    let (mut open, mut loops, mut total) = (Vec::<bool>::new(), 0u64, 0u64);
    while !reader.eof() {
        let Ok(operator) = reader.read() else { break };
        total += loops;
        match operator {
            Operator::Loop { .. } => {
                open.push(true);
                loops += 1;
            }
            Operator::Block { .. } | Operator::If { .. } | Operator::Try { .. } | Operator::TryTable { .. } => {
                open.push(false)
            }
            Operator::End if open.pop() == Some(true) => loops -= 1,
            _ => {}
        }
    }
    total
}

fn check_imports(module: &Module) -> Result<(), InvalidModule> {
    for import in module.imports() {
        let name = format!("{}.{}", import.module(), import.name());
        if !GRANTED_IMPORTS.contains(&name.as_str()) {
            return Err(InvalidModule(format!(
                "the module imports '{name}', which is not granted; a service may import only {}",
                GRANTED_IMPORTS.join(", ")
            )));
        }
        let expected: (&[ValType], &[ValType]) = match import.name() {
            "log" => (&[ValType::I32, ValType::I32, ValType::I32], &[]),
            _ => (&[], &[ValType::I64]),
        };
        match import.ty() {
            ExternType::Func(ty) if signature_is(&ty, expected) => {}
            _ => {
                return Err(InvalidModule(format!(
                    "the import '{name}' must be a function {}",
                    describe_signature(expected)
                )));
            }
        }
    }
    Ok(())
}

type Signature<'a> = (&'a [ValType], &'a [ValType]);

fn check_export(module: &Module, name: &str, signature: Option<Signature<'_>>) -> Result<(), InvalidModule> {
    let export = module.get_export(name);
    let ok = match (&export, signature) {
        (Some(ExternType::Memory(memory)), None) => !memory.is_64() && !memory.is_shared(),
        (Some(ExternType::Func(ty)), Some(signature)) => signature_is(ty, signature),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let wanted = match signature {
        None => "a 32-bit linear memory".to_string(),
        Some(signature) => format!("a function {}", describe_signature(signature)),
    };
    Err(InvalidModule(match export {
        None => format!("the module does not export '{name}' ({wanted}); see docs/service-abi.md"),
        Some(_) => format!("the export '{name}' must be {wanted}"),
    }))
}

fn optional_export(module: &Module, name: &str, signature: Signature<'_>) -> Result<bool, InvalidModule> {
    if module.get_export(name).is_none() {
        return Ok(false);
    }
    check_export(module, name, Some(signature)).map(|()| true)
}

fn signature_is(ty: &FuncType, (params, results): Signature<'_>) -> bool {
    ty.params().len() == params.len()
        && ty.results().len() == results.len()
        && ty.params().zip(params).all(|(a, b)| ValType::eq(&a, b))
        && ty.results().zip(results).all(|(a, b)| ValType::eq(&a, b))
}

fn describe_signature((params, results): Signature<'_>) -> String {
    let list = |types: &[ValType]| types.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    format!("({}) -> ({})", list(params), list(results))
}

/// Compiled modules by tenant and content hash, least recently used evicted first, and why
/// modules were refused.
///
/// Each tenant has entries of its own: a module another tenant compiled is compiled again, and
/// charged to the tenant's compile budget, as a module new to the node would be. A shared entry
/// would let a tenant tell, by a deploy that compiles nothing (quicker, and free of the budget),
/// or a refusal remembered, which modules others deployed: a guess at a secret built into
/// another tenant's module could be checked at no cost, as browsers partition their caches by
/// site against the same probe.
#[derive(Debug)]
pub struct ModuleCache {
    capacity: usize,
    /// Compiled code kept at most; a module larger than all of it is not kept.
    byte_capacity: usize,
    /// Why a std lock: held for a map lookup or insert, never while compiling.
    entries: Mutex<CacheEntries>,
    /// A turn per module being compiled, so that it is compiled once however many wait for it.
    compiling: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Why modules were refused: the same bytes sent again are refused without compiling them
    /// again (a refused deploy costs its tenant no quota).
    refused: Mutex<HashMap<CacheKey, String>>,
}

/// A tenant's module: the tenant, and the module's SHA-256.
pub type CacheKey = (String, [u8; 32]);

/// Refusals remembered at most; past it the memory starts afresh.
const REFUSALS_REMEMBERED: usize = 1024;

#[derive(Debug, Default)]
struct CacheEntries {
    modules: HashMap<CacheKey, (Prepared, u64)>,
    clock: u64,
    /// Compiled code of the modules kept.
    code_bytes: usize,
}

impl ModuleCache {
    pub fn new(capacity: usize, byte_capacity: usize) -> ModuleCache {
        ModuleCache {
            capacity: capacity.max(1),
            byte_capacity,
            entries: Mutex::new(CacheEntries::default()),
            compiling: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// Why this module was refused to its tenant, if it was.
    pub fn refusal(&self, key: &CacheKey) -> Option<String> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    pub fn remember_refusal(&self, key: CacheKey, reason: &str) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if refused.len() >= REFUSALS_REMEMBERED {
            refused.clear();
        }
        refused.insert(key, reason.to_string());
    }

    /// The module from the cache, or from `prepare`, run by one caller at a time per module:
    /// the others wait for its result instead of compiling the same bytes again (a restart
    /// brings back every service of a module at once; agents deploy a new module in parallel).
    /// `prepare` is not polled when the module is cached by the time the caller's turn comes.
    pub async fn get_or_prepare<E>(
        &self,
        key: CacheKey,
        prepare: impl Future<Output = Result<Prepared, E>>,
    ) -> Result<Prepared, E> {
        if let Some(prepared) = self.get(&key) {
            return Ok(prepared);
        }
        let turn = Arc::clone(
            self.compiling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let result = {
            let _turn = turn.lock().await;
            match self.get(&key) {
                Some(prepared) => Ok(prepared),
                None => prepare
                    .await
                    .inspect(|prepared| self.insert(key.clone(), prepared.clone())),
            }
        };
        let mut compiling = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        // Counted under the map's lock, where waiters take their handle: the map's and ours.
        if Arc::strong_count(&turn) == 2 {
            compiling.remove(&key);
        }
        result
    }

    pub fn get(&self, key: &CacheKey) -> Option<Prepared> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.clock += 1;
        let now = entries.clock;
        let (prepared, used) = entries.modules.get_mut(key)?;
        *used = now;
        Some(prepared.clone())
    }

    /// Keeps `prepared` for its tenant, letting the least recently used go while the entries or
    /// their code would be over the cache's bounds. Services running a module hold it either
    /// way: the bounds are on what the cache alone keeps alive.
    pub fn insert(&self, key: CacheKey, prepared: Prepared) {
        if prepared.code_bytes > self.byte_capacity {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.clock += 1;
        let now = entries.clock;
        if let Some((old, _)) = entries.modules.remove(&key) {
            entries.code_bytes -= old.code_bytes;
        }
        while entries.modules.len() >= self.capacity || entries.code_bytes + prepared.code_bytes > self.byte_capacity {
            let oldest = entries
                .modules
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone());
            let Some((gone, _)) = oldest.and_then(|key| entries.modules.remove(&key)) else {
                break;
            };
            entries.code_bytes -= gone.code_bytes;
        }
        entries.code_bytes += prepared.code_bytes;
        entries.modules.insert(key, (prepared, now));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).modules.len()
    }
}

/// The engine and linker every instance shares, and what a module may be to be compiled.
pub struct Compiler {
    pub engine: Engine,
    pub linker: Arc<Linker<Host>>,
    limits: CodeLimits,
}

impl Compiler {
    pub fn new(options: &EngineOptions) -> anyhow::Result<Compiler> {
        let engine = build_engine(options)?;
        let mut linker = Linker::new(&engine);
        link_host_functions(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(Compiler {
            engine,
            linker: Arc::new(linker),
            limits: CodeLimits {
                function_bytes: options.max_function_bytes,
                functions: options.max_functions,
                locals: options.max_locals,
                looped_instructions: options.max_looped_instructions,
            },
        })
    }
}

impl std::fmt::Debug for Compiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiler").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// The first function body of `wat`'s module.
    fn first_body(wasm: &[u8]) -> wasmparser::FunctionBody<'_> {
        wasmparser::Parser::new(0)
            .parse_all(wasm)
            .find_map(|p| match p {
                Ok(wasmparser::Payload::CodeSectionEntry(body)) => Some(body),
                _ => None,
            })
            .expect("a function body")
    }

    #[test]
    fn instructions_count_once_for_each_loop_around_them() {
        let count = |wat: &str| {
            let wasm = wat::parse_str(format!("(module (func {wat}))")).unwrap();
            (
                looped_instructions(&first_body(&wasm)),
                declared_locals(&first_body(&wasm)),
            )
        };
        assert_eq!(count("(nop) (nop)"), (0, 0));
        // loop nop end: the nop and the end are inside it.
        assert_eq!(count("(loop (nop))"), (2, 0));
        // loop loop nop end end: 0 + 1 + 2 + 2 + 1.
        assert_eq!(count("(loop (loop (nop)))"), (6, 0));
        // A block is no loop, but inside one it counts, as does what it holds.
        assert_eq!(count("(loop (block (nop)))"), (4, 0));
        assert_eq!(count("(loop) (loop)"), (2, 0));
        assert_eq!(count("(local i32 i64) (local $x f32)"), (0, 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_module_wanted_by_many_at_once_is_compiled_once() {
        let options = crate::runtime::RuntimeOptions::default().engine;
        let compiler = Arc::new(
            Compiler::new(&EngineOptions {
                max_instances: 4,
                ..options
            })
            .unwrap(),
        );
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/services/echo.wat");
        let wasm: Arc<[u8]> = to_wasm(&std::fs::read(path).unwrap()).unwrap().into();
        let cache = Arc::new(ModuleCache::new(4, usize::MAX));
        let compiled = Arc::new(AtomicUsize::new(0));
        let sha = [7; 32];
        let key = ("acme".to_string(), sha);
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let (cache, compiler, wasm, compiled, key) = (
                    Arc::clone(&cache),
                    Arc::clone(&compiler),
                    Arc::clone(&wasm),
                    Arc::clone(&compiled),
                    key.clone(),
                );
                tokio::spawn(async move {
                    let compile = async move {
                        compiled.fetch_add(1, Ordering::SeqCst);
                        // Long enough that every waiter arrives while it runs.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        prepare(&compiler, sha, &wasm)
                    };
                    cache.get_or_prepare(key, compile).await.map(|p| p.sha256)
                })
            })
            .collect();
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap().unwrap(), sha);
        }
        assert_eq!(compiled.load(Ordering::SeqCst), 1);
        assert!(cache.compiling.lock().unwrap().is_empty(), "no turn is left behind");
    }

    /// The proposals a service may not use are refused at validation, each by name: none
    /// slips through as a default of wasmtime's.
    #[test]
    fn wat_text_may_start_with_a_byte_order_mark_and_empty_text_is_named_as_such() {
        let plain = to_wasm(b"(module)").unwrap();
        assert_eq!(to_wasm("\u{feff}(module)".as_bytes()).unwrap(), plain);
        for empty in [&b""[..], b" \n", "\u{feff}".as_bytes()] {
            let InvalidModule(why) = to_wasm(empty).unwrap_err();
            assert!(why.starts_with("the module is empty"), "{why}");
        }
    }

    #[test]
    fn modules_using_refused_proposals_are_refused_naming_them() {
        let compiler = Compiler::new(&crate::runtime::RuntimeOptions::default().engine).unwrap();
        for (wat, proposal) in [
            ("(memory i64 1)", "memory64"),
            ("(table i64 1 funcref)", "memory64"),
            ("(memory 1 1 shared)", "threads"),
            ("(memory 1) (memory 1)", "multiple memories"),
        ] {
            let wasm = wat::parse_str(format!("(module {wat})")).unwrap();
            let Err(refused) = prepare(&compiler, [0; 32], &wasm) else {
                panic!("{wat} was accepted")
            };
            assert!(refused.to_string().contains(proposal), "{wat}: {refused}");
        }
    }

    #[test]
    fn the_cache_keeps_no_more_code_than_its_bytes_allow() {
        let compiler = Compiler::new(&crate::runtime::RuntimeOptions::default().engine).unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/services/echo.wat");
        let echo = std::fs::read_to_string(path).unwrap();
        let module = |n: u8| {
            let wasm = to_wasm(echo.replace("echo ready", &format!("echo {n}")).as_bytes()).unwrap();
            prepare(&compiler, [n; 32], &wasm).unwrap()
        };
        let (one, two, three) = (module(1), module(2), module(3));
        assert!(one.code_bytes > 0);
        let key = |n: u8| ("acme".to_string(), [n; 32]);
        let cache = ModuleCache::new(10, one.code_bytes + two.code_bytes);
        cache.insert(key(1), one);
        cache.insert(key(2), two);
        assert!(cache.get(&key(1)).is_some(), "1 is now the most recently used");
        cache.insert(key(3), three);
        assert_eq!(cache.len(), 2, "one had to go for the third's code");
        assert!(cache.get(&key(2)).is_none(), "the least recently used went");
        assert!(cache.get(&key(1)).is_some() && cache.get(&key(3)).is_some());
        assert!(
            cache.get(&("zenith".to_string(), [1; 32])).is_none(),
            "an entry is its tenant's"
        );
        // A module larger than the whole cache is compiled but not kept.
        let small = ModuleCache::new(10, 1);
        small.insert(key(4), module(4));
        assert_eq!(small.len(), 0);
    }
}
