;; count: counts to the number the request says (in decimal), then answers with nothing. Its
;; work is the same however the CPU is shared, unlike spin's, which runs by the clock: tests and
;; benchmarks use it to measure how much CPU a service was given.
(module
  (memory (export "memory") 1)

  (func (export "solo_alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 64512)) (then unreachable))
    (i32.const 1024))

  (func (export "solo_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $n i64)
    (local $i i32)
    (local $count i64)
    ;; Parse the decimal request.
    (block $parsed
      (loop $digit
        (br_if $parsed (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $n
          (i64.add (i64.mul (local.get $n) (i64.const 10))
            (i64.extend_i32_u
              (i32.sub (i32.load8_u (i32.add (local.get $ptr) (local.get $i))) (i32.const 48)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $digit)))
    (block $counted
      (loop $count
        (br_if $counted (i64.ge_u (local.get $count) (local.get $n)))
        (local.set $count (i64.add (local.get $count) (i64.const 1)))
        (br $count)))
    (i64.const 0)))
