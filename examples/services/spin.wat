;; spin: keeps the CPU busy for as many milliseconds as the request says (in decimal), then
;; answers "done". Tests use it to hold a call in flight.
(module
  (import "solo" "now_ms" (func $now_ms (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 16) "done")

  (func (export "solo_alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 64512)) (then unreachable))
    (i32.const 1024))

  (func (export "solo_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $ms i64)
    (local $i i32)
    (local $until i64)
    ;; Parse the decimal request.
    (block $parsed
      (loop $digit
        (br_if $parsed (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $ms
          (i64.add (i64.mul (local.get $ms) (i64.const 10))
            (i64.extend_i32_u
              (i32.sub (i32.load8_u (i32.add (local.get $ptr) (local.get $i))) (i32.const 48)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $digit)))
    (local.set $until (i64.add (call $now_ms) (local.get $ms)))
    (loop $spin
      (br_if $spin (i64.lt_s (call $now_ms) (local.get $until))))
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 4))))
