//! Turns on the guest threads, shared by tenants.
//!
//! A guest yields at every epoch tick, and tokio runs the runnable tasks in turn: fair among
//! instances, not among tenants. A tenant with forty looping services would get forty slices of
//! the threads for each one of a tenant with one. So guest code runs only while it holds a
//! turn. There are as many turns as guest threads, but a tenant that holds none always gets
//! one at once, beyond them if need be: its guest runs among the others straight away, as a
//! process does on a busy Unix machine. Past that, a turn goes to the waiting tenant that holds
//! the fewest (in rotation among equals), and within a tenant to its guests in the order they
//! came. At every tick a guest gives its turn up if turns are over-dealt (it then waits in line,
//! and those holding one hand theirs to it in rotation), hands it to a tenant holding fewer, or
//! else to the next guest of its own tenant, and keeps it if no one waits. Busy tenants so get
//! even shares however many services each keeps busy, and a tenant alone may use every thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The node's turns on its guest threads.
#[derive(Debug)]
pub(super) struct GuestTurns {
    dealer: Mutex<Dealer>,
}

#[derive(Debug, Default)]
struct Dealer {
    /// Turns no one holds; while any are free, no one waits. Below zero when tenants that held
    /// none were dealt one beyond the guest threads.
    free: isize,
    /// Tenants with guests waiting, in the order they get the next turns among equals.
    rotation: VecDeque<u64>,
    /// Turns each tenant holds, for tenants that hold any.
    held: HashMap<u64, usize>,
    /// Each such tenant's waiting guests, in the order they came.
    waiting: HashMap<u64, VecDeque<u64>>,
    /// How to wake each waiting guest.
    wakers: HashMap<u64, Waker>,
    /// Guests given a turn that have not yet seen it.
    dealt: HashSet<u64>,
    next_tenant: u64,
    next_guest: u64,
}

impl Dealer {
    fn held(&self, tenant: u64) -> usize {
        self.held.get(&tenant).copied().unwrap_or(0)
    }

    fn hold(&mut self, tenant: u64) {
        *self.held.entry(tenant).or_default() += 1;
    }

    fn give_up(&mut self, tenant: u64) {
        if let Some(held) = self.held.get_mut(&tenant) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(&tenant);
            }
        }
    }

    /// The waiting tenant, other than `except`, that holds the fewest turns, first in the
    /// rotation among equals.
    fn neediest(&self, except: Option<u64>) -> Option<(usize, u64)> {
        self.rotation
            .iter()
            .enumerate()
            .filter(|&(_, &tenant)| Some(tenant) != except)
            .min_by_key(|&(_, &tenant)| self.held(tenant))
            .map(|(place, &tenant)| (place, tenant))
    }

    /// A turn that `tenant` held is free: it goes to the neediest waiting tenant, or back to
    /// the free ones. Returns whom to wake.
    fn release(&mut self, tenant: u64) -> Option<Waker> {
        self.give_up(tenant);
        self.free += 1;
        let (place, next) = self.neediest(None)?;
        // Over-dealt, the turn goes back, unless a tenant waits that now holds none.
        if self.free <= 0 && self.held(next) > 0 {
            return None;
        }
        self.free -= 1;
        self.deal(place, next)
    }

    /// Whether a guest of `tenant` may run without waiting: when a turn is free, and when its
    /// tenant holds none, unless the guest has just let its turn go (`in_line`).
    fn may_take(&self, tenant: u64, in_line: bool) -> bool {
        self.free > 0 || (!in_line && self.held(tenant) == 0)
    }

    /// At a tick of `tenant`'s guest: its turn is given up if turns are over-dealt, or goes to
    /// a waiting tenant that holds fewer, or else to the next guest of its own. Returns whether
    /// the guest let its turn go (it then waits in line), and whom to wake.
    fn hand_over(&mut self, tenant: u64) -> (bool, Option<Waker>) {
        if self.free < 0 {
            self.give_up(tenant);
            self.free += 1;
            return (true, None);
        }
        if let Some((place, other)) = self.neediest(Some(tenant))
            && self.held(other) < self.held(tenant)
        {
            self.give_up(tenant);
            return (true, self.deal(place, other));
        }
        match self.rotation.iter().position(|&t| t == tenant) {
            Some(place) => {
                self.give_up(tenant);
                (true, self.deal(place, tenant))
            }
            None => (false, None),
        }
    }

    /// Deals a turn to the first guest waiting of `tenant`, at `place` in the rotation, which
    /// moves to the back of it if more of its guests wait.
    fn deal(&mut self, place: usize, tenant: u64) -> Option<Waker> {
        self.rotation.remove(place);
        let queue = self.waiting.get_mut(&tenant).expect("a tenant in the rotation waits");
        let guest = queue.pop_front().expect("a waiting tenant has a guest waiting");
        if queue.is_empty() {
            self.waiting.remove(&tenant);
        } else {
            self.rotation.push_back(tenant);
        }
        self.hold(tenant);
        self.dealt.insert(guest);
        self.wakers.remove(&guest)
    }

    fn wait(&mut self, tenant: u64, waker: &Waker) -> u64 {
        let guest = self.next_guest;
        self.next_guest += 1;
        let queue = self.waiting.entry(tenant).or_default();
        if queue.is_empty() {
            self.rotation.push_back(tenant);
        }
        queue.push_back(guest);
        self.wakers.insert(guest, waker.clone());
        guest
    }

    /// Takes `guest` out of the line of `tenant`.
    fn leave(&mut self, tenant: u64, guest: u64) {
        self.wakers.remove(&guest);
        if let Some(queue) = self.waiting.get_mut(&tenant) {
            queue.retain(|&g| g != guest);
            if queue.is_empty() {
                self.waiting.remove(&tenant);
                self.rotation.retain(|&t| t != tenant);
            }
        }
    }
}

impl GuestTurns {
    pub fn new(guest_threads: usize) -> Arc<GuestTurns> {
        Arc::new(GuestTurns {
            dealer: Mutex::new(Dealer {
                free: isize::try_from(guest_threads.max(1)).unwrap_or(isize::MAX),
                ..Dealer::default()
            }),
        })
    }

    /// A tenant's place in the rotation; all its instances share it.
    pub fn tenant(self: &Arc<Self>) -> TenantTurns {
        let tenant = {
            let mut dealer = self.lock();
            dealer.next_tenant += 1;
            dealer.next_tenant
        };
        TenantTurns {
            turns: Arc::clone(self),
            tenant,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Dealer> {
        self.dealer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, tenant: u64) {
        let woken = self.lock().release(tenant);
        if let Some(waker) = woken {
            waker.wake();
        }
    }

    /// Passes `tenant`'s turn on if a guest should have it; returns whether it did.
    fn hand_over(&self, tenant: u64) -> bool {
        let (handed, woken) = self.lock().hand_over(tenant);
        if let Some(waker) = woken {
            waker.wake();
        }
        handed
    }
}

/// One tenant's place among the turns, shared by all its services.
#[derive(Clone, Debug)]
pub(super) struct TenantTurns {
    turns: Arc<GuestTurns>,
    tenant: u64,
}

impl TenantTurns {
    /// The turn of one instance of the tenant's services.
    pub fn guest(&self) -> GuestTurn {
        GuestTurn(Arc::new(Holder {
            tenant: self.clone(),
            held: Mutex::default(),
        }))
    }

    fn wait(&self, in_line: bool) -> Wait<'_> {
        Wait {
            turns: self,
            in_line,
            guest: None,
            dealt: false,
        }
    }
}

/// One instance's hold on a turn. Cheap to clone: the instance holds one, its epoch callback
/// another. Guest code runs only while it holds a turn; it keeps it between calls while it has
/// more to serve and has not had a tick of it, as a thread keeps its time slice. A turn still
/// held when the last clone goes (an instance dropped mid-call, a start given up) comes back.
#[derive(Clone, Debug)]
pub(super) struct GuestTurn(Arc<Holder>);

#[derive(Debug)]
struct Holder {
    tenant: TenantTurns,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// Since when the instance holds its turn; `None` while it holds none.
    since: Option<Instant>,
    /// How long it held turns before that.
    before: Duration,
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.held.get_mut().unwrap_or_else(|p| p.into_inner()).since.is_some() {
            self.tenant.turns.release(self.tenant.tenant);
        }
    }
}

impl GuestTurn {
    /// Waits for a turn, unless the instance holds one already.
    pub async fn take(&self) {
        if self.held_since().is_none() {
            self.0.tenant.wait(false).await;
            self.hold(Some(Instant::now()));
        }
    }

    /// Lets the turn go, if the instance holds one.
    pub fn release(&self) {
        if self.hold(None).is_some() {
            self.0.tenant.turns.release(self.0.tenant.tenant);
        }
    }

    /// Lets the turn go if the instance has held it for `slice` or longer.
    pub fn release_after(&self, slice: Duration) {
        if self.held_since().is_some_and(|since| since.elapsed() >= slice) {
            self.release();
        }
    }

    /// What a guest does at every tick, its turn in hand: lets the thread run the other tasks
    /// queued on it, then hands the turn on if a guest should have it, and waits for another.
    pub fn hand_on(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let turn = self.clone();
        Box::pin(async move {
            to_the_back_of_the_queue().await;
            let tenant = &turn.0.tenant;
            if turn.held_since().is_some() && tenant.turns.hand_over(tenant.tenant) {
                turn.hold(None);
                tenant.wait(true).await;
                turn.hold(Some(Instant::now()));
            }
        })
    }

    /// How long the instance has held turns in all: the time its guest code had the threads,
    /// waits for turns left out.
    pub fn held_for(&self) -> Duration {
        let held = self.held();
        held.before + held.since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    fn held_since(&self) -> Option<Instant> {
        self.held().since
    }

    /// Records whether the turn is held; returns what was recorded before.
    fn hold(&self, since: Option<Instant>) -> Option<Instant> {
        let mut held = self.held();
        let was = std::mem::replace(&mut held.since, since);
        if let Some(held_since) = was {
            held.before += held_since.elapsed();
        }
        was
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.0.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Waits in the tenant's line for a turn. Dropped before it is dealt one, it leaves the line;
/// dropped after, it hands the turn on.
struct Wait<'a> {
    turns: &'a TenantTurns,
    /// Whether the guest has just let its turn go, and so gets none beyond the guest threads.
    in_line: bool,
    guest: Option<u64>,
    dealt: bool,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let turns = self.turns;
        let mut dealer = turns.turns.lock();
        match self.guest {
            None if dealer.may_take(turns.tenant, self.in_line) => {
                dealer.free -= 1;
                dealer.hold(turns.tenant);
            }
            None => {
                let guest = dealer.wait(turns.tenant, cx.waker());
                drop(dealer);
                self.guest = Some(guest);
                return Poll::Pending;
            }
            Some(guest) if dealer.dealt.remove(&guest) => {}
            Some(guest) => {
                dealer.wakers.insert(guest, cx.waker().clone());
                return Poll::Pending;
            }
        }
        drop(dealer);
        self.dealt = true;
        Poll::Ready(())
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let (Some(guest), false) = (self.guest, self.dealt) else {
            return;
        };
        let turns = &self.turns.turns;
        let mut dealer = turns.lock();
        if dealer.dealt.remove(&guest) {
            let woken = dealer.release(self.turns.tenant);
            drop(dealer);
            if let Some(waker) = woken {
                waker.wake();
            }
        } else {
            dealer.leave(self.turns.tenant, guest);
        }
    }
}

/// Yields to the tasks queued on this thread. Not `tokio::task::yield_now`, which defers the
/// task until the thread runs out of work, behind every task woken meanwhile: a task woken
/// while it runs goes to the back of the run queue instead.
fn to_the_back_of_the_queue() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn free(turns: &GuestTurns) -> isize {
        turns.lock().free
    }

    fn held(turns: &GuestTurns, tenant: &TenantTurns) -> usize {
        turns.lock().held(tenant.tenant)
    }

    /// Whether `future` is still waiting after one poll.
    fn waits<F: Future + Unpin>(future: &mut F) -> bool {
        future.now_or_never().is_none()
    }

    /// A guest of `tenant` that holds a turn.
    async fn running(tenant: &TenantTurns) -> GuestTurn {
        let guest = tenant.guest();
        guest.take().await;
        guest
    }

    #[tokio::test]
    async fn a_tenant_runs_as_many_guests_at_once_as_there_are_turns() {
        let turns = GuestTurns::new(2);
        let tenant = turns.tenant();
        let (a, b, c) = (running(&tenant).await, running(&tenant).await, tenant.guest());
        let mut third = Box::pin(c.take());
        assert!(waits(&mut third), "a third ran beside two");
        b.release();
        third.await;
        // Taking a turn held already, or letting go of one not held, changes nothing.
        c.take().await;
        b.release();
        a.release();
        c.release();
        assert_eq!(free(&turns), 2, "every turn came back");
    }

    #[tokio::test]
    async fn a_turn_is_kept_between_calls_for_a_tick() {
        let turns = GuestTurns::new(1);
        let guest = running(&turns.tenant()).await;
        guest.release_after(Duration::from_secs(60));
        assert_eq!(free(&turns), 0, "kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
        guest.release_after(Duration::ZERO);
        assert_eq!(free(&turns), 1, "let go");
        let held = guest.held_for();
        assert!(held >= Duration::from_millis(20), "{held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(guest.held_for(), held, "no turn, no time");
    }

    #[tokio::test]
    async fn a_tenant_that_holds_no_turn_never_waits_and_the_one_with_more_gives_one_up() {
        let turns = GuestTurns::new(2);
        let (busy, quiet) = (turns.tenant(), turns.tenant());
        let (busy_1, _busy_2, busy_3) = (running(&busy).await, running(&busy).await, busy.guest());
        let mut busy_3_waiting = Box::pin(busy_3.take());
        assert!(waits(&mut busy_3_waiting));
        // Quiet runs at once, beyond the two turns.
        let quiet_1 = running(&quiet).await;
        assert_eq!(free(&turns), -1);
        // At its next tick, one of busy's guests gives its turn up and waits, and busy's
        // waiting guest gets nothing: the threads are shared one each.
        let mut giving_up = busy_1.hand_on();
        assert!(waits(&mut giving_up), "the yield");
        assert!(waits(&mut giving_up), "now waiting");
        assert_eq!((held(&turns, &busy), held(&turns, &quiet), free(&turns)), (1, 1, 0));
        assert!(waits(&mut busy_3_waiting));
        // Quiet done, its turn goes to busy's first waiting guest.
        quiet_1.release();
        assert!(
            busy_3_waiting.as_mut().now_or_never().is_some(),
            "busy's waiting guest runs"
        );
        assert!(waits(&mut giving_up));
        assert_eq!((held(&turns, &busy), free(&turns)), (2, 0));
    }

    #[tokio::test]
    async fn a_tenant_left_holding_none_while_its_guests_wait_is_dealt_one_at_once() {
        let turns = GuestTurns::new(1);
        let (a, b) = (turns.tenant(), turns.tenant());
        let a_1 = running(&a).await;
        let _b_1 = running(&b).await;
        let a_2 = a.guest();
        let mut a_2_waiting = Box::pin(a_2.take());
        assert!(waits(&mut a_2_waiting));
        // Turns are over-dealt, but a would hold none: its waiting guest runs.
        a_1.release();
        assert!(a_2_waiting.as_mut().now_or_never().is_some());
        assert_eq!(free(&turns), -1);
    }

    #[tokio::test]
    async fn over_dealt_the_turns_go_round_the_tenants_a_tick_each() {
        let turns = GuestTurns::new(2);
        let (a, b, c) = (turns.tenant(), turns.tenant(), turns.tenant());
        let (a_1, b_1, _c_1) = (running(&a).await, running(&b).await, running(&c).await);
        assert_eq!(free(&turns), -1);
        // At its tick, a's guest lets its turn go and waits, though a then holds none.
        let mut a_ticks = a_1.hand_on();
        assert!(waits(&mut a_ticks) && waits(&mut a_ticks));
        assert_eq!((held(&turns, &a), free(&turns)), (0, 0));
        // At b's tick, b hands its turn to a, which holds fewer.
        let mut b_ticks = b_1.hand_on();
        assert!(waits(&mut b_ticks) && waits(&mut b_ticks));
        assert!(a_ticks.as_mut().now_or_never().is_some(), "a runs again");
        assert_eq!((held(&turns, &a), held(&turns, &b), held(&turns, &c)), (1, 0, 1));
    }

    #[tokio::test]
    async fn a_freed_turn_goes_to_the_waiting_tenant_that_holds_the_fewest() {
        let turns = GuestTurns::new(4);
        let (a, b) = (turns.tenant(), turns.tenant());
        let (_a_1, _a_2, a_3) = (running(&a).await, running(&a).await, running(&a).await);
        let _b_1 = running(&b).await;
        // a's guest waits first, then b's; a holds three turns, b one.
        let (a_4, b_2) = (a.guest(), b.guest());
        let (mut a_4_waiting, mut b_2_waiting) = (Box::pin(a_4.take()), Box::pin(b_2.take()));
        assert!(waits(&mut a_4_waiting) && waits(&mut b_2_waiting));
        a_3.release();
        assert!(b_2_waiting.as_mut().now_or_never().is_some(), "b held fewer");
        assert!(waits(&mut a_4_waiting));
    }

    #[tokio::test]
    async fn at_a_tick_a_guest_hands_its_turn_to_fewer_or_to_its_own_and_else_keeps_it() {
        let turns = GuestTurns::new(2);
        let (busy, quiet) = (turns.tenant(), turns.tenant());
        let (busy_1, quiet_1) = (running(&busy).await, running(&quiet).await);
        // No one waits: the turn stays (after one yield).
        quiet_1.hand_on().await;
        let busy_2 = busy.guest();
        let mut busy_2_waiting = Box::pin(busy_2.take());
        assert!(waits(&mut busy_2_waiting));
        // Quiet holds one turn, as busy does: it keeps its own.
        quiet_1.hand_on().await;
        assert!(waits(&mut busy_2_waiting));
        // Busy's running guest hands its turn to busy's waiting one.
        let mut handing_on = busy_1.hand_on();
        assert!(waits(&mut handing_on), "the yield");
        assert!(waits(&mut handing_on), "now waiting");
        assert!(
            busy_2_waiting.as_mut().now_or_never().is_some(),
            "busy's waiting guest runs"
        );
        assert_eq!((held(&turns, &busy), held(&turns, &quiet)), (1, 1));
        assert!(
            busy_1.held_since().is_none(),
            "the one that handed its turn on holds none"
        );
    }

    #[tokio::test]
    async fn a_guest_given_up_while_it_waits_holds_no_turn_and_loses_none() {
        let turns = GuestTurns::new(1);
        let tenant = turns.tenant();
        let first = running(&tenant).await;
        // One guest leaves the line before it is dealt a turn.
        let leaving = tenant.guest();
        let mut leaving_waits = Box::pin(leaving.take());
        assert!(waits(&mut leaving_waits));
        drop(leaving_waits);
        // Another is dealt a turn and dropped before it sees it: the turn comes back.
        let unseen = tenant.guest();
        let mut dealt_unseen = Box::pin(unseen.take());
        assert!(waits(&mut dealt_unseen));
        first.release();
        drop(dealt_unseen);
        // One gives its turn up at a tick and is dropped while it waits for another.
        let ticking = running(&tenant).await;
        let other = tenant.guest();
        let mut other_waits = Box::pin(other.take());
        assert!(waits(&mut other_waits));
        let mut handing_on = ticking.hand_on();
        assert!(waits(&mut handing_on) && waits(&mut handing_on));
        drop(handing_on);
        ticking.release();
        other_waits.await;
        // The last clone of a guest that holds a turn goes: the turn comes back.
        let clone = other.clone();
        drop(other);
        assert_eq!(free(&turns), 0, "a clone still holds it");
        drop(clone);
        assert_eq!(free(&turns), 1);
        let dealer = turns.lock();
        assert!(dealer.rotation.is_empty() && dealer.waiting.is_empty() && dealer.wakers.is_empty());
        assert!(dealer.dealt.is_empty() && dealer.held.is_empty());
    }
}
