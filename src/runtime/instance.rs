//! One instance of a service: its `Store`, the host functions it may call, its limits, and the
//! calling convention of the guest ABI (`docs/service-abi.md`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::{Caller, Linker, Memory, ResourceLimiter, Store, Trap, TypedFunc, UpdateDeadline};

use super::error::{CallFailure, StartFailure};
use super::logs::{Level, LogBuffer};
use super::module::Prepared;
use super::turns::{GuestTurn, TenantTurns};
use crate::proto::{CrashReason, Limits};

/// Longest log line kept; longer ones are cut.
pub(super) const MAX_LOG_LINE: usize = 4096;

/// What a store carries for the host: limits, the budget of the call at hand, and where logs go.
pub struct Host {
    limiter: MemoryLimiter,
    budget: Budget,
    logs: Arc<LogBuffer>,
    version: u64,
}

/// Caps linear memory; remembers that it refused, so a trap that follows is reported as a
/// memory-limit crash.
struct MemoryLimiter {
    max_bytes: usize,
    refused: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }
}

/// The running call's limits, checked at every epoch tick.
struct Budget {
    /// The guest's running time in this call so far, counted at each tick: the time since it
    /// last began to run, however many ticks passed meanwhile (one bulk memory instruction can
    /// outlast many, and is checked only once it ends).
    used: Duration,
    max: Duration,
    /// When the guest last began to run: the call's start, or its return to the threads after
    /// a turn it gave up. Set by the future it waits on, hence shared.
    running_since: Arc<Mutex<Instant>>,
    deadline: Instant,
}

impl Budget {
    fn running_since(&self) -> Instant {
        *self.running_since.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The guest runs from now on (it has its turn).
    fn runs_from(&self, now: Instant) {
        *self.running_since.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }
}

/// Why the epoch callback stopped the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    #[error("the call ran past its CPU limit")]
    CpuLimit,
    #[error("the call ran past its time limit")]
    Timeout,
}

/// A guest broke the ABI in a call to a host function (a message outside its memory): the call
/// fails as `abi_violation`, as when `solo_alloc` or `solo_handle` answer out of bounds.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
struct AbiViolation(&'static str);

/// Registers the host functions of module `solo` (the granted imports).
pub fn link_host_functions(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "solo",
        "log",
        |mut caller: Caller<'_, Host>, level: i32, ptr: i32, len: i32| {
            let message = read_guest_string(&mut caller, ptr, len)?;
            let host = caller.data();
            host.logs.push(Level::from_guest(level), host.version, message);
            Ok(())
        },
    )?;
    linker.func_wrap("solo", "now_ms", || -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    })?;
    Ok(())
}

fn read_guest_string(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return Err(wasmtime::Error::new(AbiViolation(
            "solo.log: the module exports no memory",
        )));
    };
    let data = memory.data(&caller);
    let range = guest_range(ptr as u32, len as u32, data.len())
        .ok_or_else(|| wasmtime::Error::new(AbiViolation("solo.log: the message is outside linear memory")))?;
    let bytes = &data[range];
    let cut = &bytes[..bytes.len().min(MAX_LOG_LINE)];
    Ok(String::from_utf8_lossy(cut).into_owned())
}

fn guest_range(ptr: u32, len: u32, memory_len: usize) -> Option<std::ops::Range<usize>> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize)?;
    (end <= memory_len).then_some(start..end)
}

/// A live instance of a service.
pub struct Instance {
    store: Store<Host>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    handle: TypedFunc<(i32, i32), i64>,
    stop: Option<TypedFunc<(), ()>>,
    limits: Limits,
    tick: Duration,
    max_response_bytes: usize,
    turn: GuestTurn,
    _counted: Counted,
}

/// The node's instances alive, each counted from the end of its start until it is dropped:
/// those serving calls, and those an upgrade replaced that are finishing theirs.
#[derive(Debug, Clone, Default)]
pub struct InstanceCount(Arc<AtomicUsize>);

impl InstanceCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn count(&self) -> Counted {
        self.0.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(&self.0))
    }
}

/// One instance's place in its [`InstanceCount`], given back when it is dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What an instance needs besides its module.
#[derive(Clone)]
pub struct InstanceConfig {
    pub limits: Limits,
    pub version: u64,
    pub logs: Arc<LogBuffer>,
    pub tick: Duration,
    pub max_response_bytes: usize,
    /// Time `solo_init` (and the module's start function) may take.
    pub start_timeout: Duration,
    /// Its tenant's place among the turns on the guest threads.
    pub turns: TenantTurns,
    /// Where it counts itself while alive.
    pub alive: InstanceCount,
}

impl InstanceConfig {
    /// The wall-clock time one call may take (the service's own limit, not its caller's).
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.call_timeout_ms.max(1).into())
    }
}

impl Instance {
    /// Instantiates the module and runs `solo_init`.
    pub async fn start(prepared: &Prepared, config: InstanceConfig) -> Result<Instance, StartFailure> {
        let engine = prepared.pre.module().engine();
        let host = Host {
            limiter: MemoryLimiter {
                max_bytes: config.limits.memory_bytes as usize,
                refused: false,
            },
            budget: Budget {
                used: Duration::ZERO,
                max: Duration::MAX,
                running_since: Arc::new(Mutex::new(Instant::now())),
                deadline: Instant::now(),
            },
            logs: config.logs,
            version: config.version,
        };
        let mut store = Store::new(engine, host);
        store.limiter(|host| &mut host.limiter);
        let turn = config.turns.guest();
        let ticking = turn.clone();
        store.epoch_deadline_callback(move |mut ctx| {
            let now = Instant::now();
            let budget = &mut ctx.data_mut().budget;
            budget.used += now.saturating_duration_since(budget.running_since());
            if budget.used > budget.max {
                return Err(wasmtime::Error::new(Interrupted::CpuLimit));
            }
            if now >= budget.deadline {
                return Err(wasmtime::Error::new(Interrupted::Timeout));
            }
            // Give the thread back at every tick: a looping guest cannot starve the others, nor
            // a tenant's many guests another tenant's few. The time it waits is not its own.
            let handed_on = ticking.hand_on();
            let resumed = Arc::clone(&budget.running_since);
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    handed_on.await;
                    *resumed.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
                }),
            ))
        });
        let budget_ms = config.limits.cpu_ms_per_call.max(1) as u64;
        arm(&mut store, budget_ms, config.start_timeout);
        turn.take().await;
        store.data().budget.runs_from(Instant::now());
        let instance = prepared
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| init_failure(&e, &store, "instantiation failed"))?;
        let exports = (|| {
            Some((
                instance.get_memory(&mut store, "memory")?,
                instance.get_typed_func::<i32, i32>(&mut store, "solo_alloc").ok()?,
                instance
                    .get_typed_func::<(i32, i32), i64>(&mut store, "solo_handle")
                    .ok()?,
            ))
        })();
        let Some((memory, alloc, handle)) = exports else {
            return Err(StartFailure::new(CrashReason::LoadFailure, "exports vanished"));
        };
        let stop = if prepared.has_stop {
            instance.get_typed_func::<(), ()>(&mut store, "solo_stop").ok()
        } else {
            None
        };
        if prepared.has_init {
            let init = instance
                .get_typed_func::<(), i32>(&mut store, "solo_init")
                .map_err(|e| StartFailure::new(CrashReason::LoadFailure, format!("{e:#}")))?;
            arm(&mut store, budget_ms, config.start_timeout);
            match init.call_async(&mut store, ()).await {
                Ok(0) => {}
                Ok(code) => {
                    return Err(StartFailure::new(
                        CrashReason::InitFailure,
                        format!("solo_init returned {code}"),
                    ));
                }
                Err(e) => {
                    return Err(init_failure(&e, &store, "solo_init failed"));
                }
            }
        }
        // Until its first call: a failed start lets the turn go as the store and `turn` drop.
        turn.release();
        Ok(Instance {
            store,
            memory,
            alloc,
            handle,
            stop,
            limits: config.limits,
            tick: config.tick,
            max_response_bytes: config.max_response_bytes,
            turn,
            _counted: config.alive.count(),
        })
    }

    /// Bytes of linear memory in use.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.data_size(&self.store) as u64
    }

    /// One request: `solo_alloc`, copy in, `solo_handle`, copy the response out.
    pub async fn call(&mut self, payload: &[u8], deadline: Instant) -> Result<Vec<u8>, CallFailure> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        // The time limit runs from the first turn: waiting for it is queueing, not the call's.
        self.turn.take().await;
        let served = self.call_with_turn(payload, timeout).await;
        // Kept for the next call in the mailbox unless it has had its tick: serving calls one
        // after another without handing the turn on costs no wake-ups.
        self.turn.release_after(self.tick);
        served
    }

    /// Lets the instance's turn go: it has no call to serve.
    pub fn idle(&self) {
        self.turn.release();
    }

    /// Waits for a turn on the guest threads, unless the instance holds one: a call's caller
    /// may have given up meanwhile.
    pub async fn take_turn(&self) {
        self.turn.take().await;
    }

    /// How long the instance's guest code has had the threads, in all.
    pub fn guest_time(&self) -> Duration {
        self.turn.held_for()
    }

    async fn call_with_turn(&mut self, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, CallFailure> {
        arm(&mut self.store, self.limits.cpu_ms_per_call.max(1) as u64, timeout);
        let len = i32::try_from(payload.len()).map_err(|_| CallFailure::abi("the request is over 2 GiB"))?;
        let ptr = self
            .alloc
            .call_async(&mut self.store, len)
            .await
            .map_err(|e| self.failure(e))?;
        let range = guest_range(ptr as u32, len as u32, self.memory.data_size(&self.store))
            .ok_or_else(|| CallFailure::abi(format!("solo_alloc({len}) returned {ptr}, outside linear memory")))?;
        self.memory.data_mut(&mut self.store)[range].copy_from_slice(payload);
        let packed = self
            .handle
            .call_async(&mut self.store, (ptr, len))
            .await
            .map_err(|e| self.failure(e))?;
        let is_error = packed < 0;
        let out_ptr = ((packed as u64 >> 32) & 0x7fff_ffff) as u32;
        let out_len = packed as u32;
        // Outside memory is a broken ABI, whatever the length: checked before the size limit.
        let range = guest_range(out_ptr, out_len, self.memory.data_size(&self.store))
            .ok_or_else(|| CallFailure::abi("solo_handle returned a response outside linear memory"))?;
        if out_len as usize > self.max_response_bytes {
            return Err(CallFailure::ResponseTooLarge {
                bytes: out_len,
                limit: self.max_response_bytes,
            });
        }
        let bytes = self.memory.data(&self.store)[range].to_vec();
        if is_error {
            return Err(CallFailure::Service(String::from_utf8_lossy(&bytes).into_owned()));
        }
        Ok(bytes)
    }

    /// Runs `solo_stop`, if exported, under a call's CPU limit and within `grace`. The
    /// instance goes away either way; a failure is described for the stop's record.
    pub async fn stop(mut self, grace: Duration) -> Result<(), String> {
        let Some(stop) = self.stop.take() else { return Ok(()) };
        arm(&mut self.store, self.limits.cpu_ms_per_call.max(1) as u64, grace);
        self.turn.take().await;
        self.store.data().budget.runs_from(Instant::now());
        let failure = match stop.call_async(&mut self.store, ()).await {
            Ok(()) => return Ok(()),
            Err(e) => describe_failure(&e, &self.store),
        };
        let host = self.store.data();
        tracing::info!(
            tenant = %host.logs.tenant,
            service = %host.logs.service_id,
            version = host.version,
            error = %failure,
            "solo_stop did not finish; the instance is dropped"
        );
        Err(failure)
    }

    fn failure(&self, error: wasmtime::Error) -> CallFailure {
        classify(&error, &self.store)
    }
}

/// Starts a fresh budget: CPU time, from now, and a wall-clock deadline.
fn arm(store: &mut Store<Host>, cpu_ms: u64, timeout: Duration) {
    let now = Instant::now();
    let budget = &mut store.data_mut().budget;
    budget.used = Duration::ZERO;
    budget.max = Duration::from_millis(cpu_ms);
    budget.runs_from(now);
    budget.deadline = now + timeout;
    store.set_epoch_deadline(1);
}

/// A start that trapped (in `solo_init`, or a start function): `what` failed, and how.
fn init_failure(error: &wasmtime::Error, store: &Store<Host>, what: &str) -> StartFailure {
    let trap_code = match classify(error, store) {
        CallFailure::Trap { trap_code, .. } => trap_code,
        CallFailure::Timeout => "start_timeout".into(),
        _ => String::new(),
    };
    StartFailure {
        reason: CrashReason::InitFailure,
        trap_code,
        message: format!("{what}: {}", describe_failure(error, store)),
    }
}

/// Sorts a guest failure into a crash reason and a trap code.
fn classify(error: &wasmtime::Error, store: &Store<Host>) -> CallFailure {
    if let Some(interrupted) = error.downcast_ref::<Interrupted>() {
        return match interrupted {
            Interrupted::CpuLimit => CallFailure::Trap {
                reason: CrashReason::CpuLimit,
                trap_code: "cpu_limit".into(),
                message: interrupted.to_string(),
            },
            Interrupted::Timeout => CallFailure::Timeout,
        };
    }
    if error.downcast_ref::<AbiViolation>().is_some() {
        return CallFailure::abi(trap_message(error));
    }
    let trap_code = error
        .downcast_ref::<Trap>()
        .map_or("host_error", |trap| trap_code(*trap));
    let reason = if store.data().limiter.refused {
        CrashReason::MemoryLimit
    } else {
        CrashReason::Trap
    };
    CallFailure::Trap {
        reason,
        trap_code: trap_code.into(),
        message: trap_message(error),
    }
}

/// What went wrong, for a person: the trap (or host error) itself and the guest function it
/// happened in, without wasmtime's whole backtrace.
fn trap_message(error: &wasmtime::Error) -> String {
    // wasmtime says "wasm trap: " before each trap's own words; the kind is given beside them.
    let cause = error.root_cause().to_string();
    let cause = cause.strip_prefix("wasm trap: ").map(str::to_string).unwrap_or(cause);
    let function = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|backtrace| backtrace.frames().first())
        .map(|frame| match frame.func_name() {
            Some(name) => format!("function '{name}'"),
            None => format!("function #{}", frame.func_index()),
        });
    let message = match function {
        Some(function) => format!("{cause}, in {function}"),
        None => cause,
    };
    crate::limits::cut_to(message, crate::limits::MAX_FAILURE_MESSAGE_BYTES)
}

fn describe_failure(error: &wasmtime::Error, store: &Store<Host>) -> String {
    match classify(error, store) {
        CallFailure::Trap { trap_code, message, .. } => format!("{trap_code}: {message}"),
        other => other.to_string(),
    }
}

/// The snake_case name of a trap, as events and errors carry it.
pub fn trap_code(trap: Trap) -> &'static str {
    match trap {
        Trap::StackOverflow => "stack_overflow",
        Trap::MemoryOutOfBounds => "memory_out_of_bounds",
        Trap::HeapMisaligned => "heap_misaligned",
        Trap::TableOutOfBounds => "table_out_of_bounds",
        Trap::IndirectCallToNull => "indirect_call_to_null",
        Trap::BadSignature => "bad_signature",
        Trap::IntegerOverflow => "integer_overflow",
        Trap::IntegerDivisionByZero => "integer_division_by_zero",
        Trap::BadConversionToInteger => "bad_conversion_to_integer",
        Trap::UnreachableCodeReached => "unreachable",
        Trap::Interrupt => "interrupt",
        Trap::OutOfFuel => "out_of_fuel",
        // Traps of proposals Solo does not enable (GC, threads, exceptions, ...).
        _ => "other",
    }
}
