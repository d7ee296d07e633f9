;; counter: state kept across calls. Every call adds one and answers the new count in decimal
;; ("1", "2", ...). A restart or an upgrade starts again from zero: linear memory belongs to an
;; instance.
(module
  (memory (export "memory") 1)
  (global $count (mut i64) (i64.const 0))

  ;; The request is ignored; it is written at 1024 (up to 63 KiB).
  (func (export "solo_alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 64512)) (then unreachable))
    (i32.const 1024))

  (func (export "solo_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $n i64)
    (local $pos i32)
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    (local.set $n (global.get $count))
    ;; Write the digits backwards, ending at offset 64.
    (local.set $pos (i32.const 64))
    (loop $digits
      (local.set $pos (i32.sub (local.get $pos) (i32.const 1)))
      (i32.store8 (local.get $pos)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $digits (i64.ne (local.get $n) (i64.const 0))))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $pos)) (i64.const 32))
      (i64.extend_i32_u (i32.sub (i32.const 64) (local.get $pos))))))
