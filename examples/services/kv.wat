;; kv: a tiny key-value actor. Requests are text:
;;   set <key> <value>   -> "ok"
;;   get <key>           -> the value
;;   del <key>           -> "ok"
;; A missing key, a full store or a malformed request is an application error (bit 63 of the
;; result), not a trap: the instance and its data live on. Keys take up to 56 bytes, values up
;; to 192; the store holds 64 entries.
(module
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (data (i32.const 32) "no such key")
  (data (i32.const 48) "store is full")
  (data (i32.const 64) "key or value too long")
  (data (i32.const 96) "unknown command; use set, get or del")

  ;; Entries: 64 x 256 bytes from offset 4096: [key_len u32][val_len u32][key 56][value 192].
  (global $entries i32 (i32.const 4096))
  (global $slots i32 (i32.const 64))
  ;; Requests are written at 32768.
  (global $request i32 (i32.const 32768))

  (func (export "solo_alloc") (param $len i32) (result i32)
    (local $pages i32)
    (local.set $pages
      (i32.shr_u (i32.add (i32.add (global.get $request) (local.get $len)) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable))))
    (global.get $request))

  (func $pack (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.extend_i32_u (local.get $len))))

  (func $error (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.const 0x8000000000000000) (call $pack (local.get $ptr) (local.get $len))))

  (func $entry (param $i i32) (result i32)
    (i32.add (global.get $entries) (i32.mul (local.get $i) (i32.const 256))))

  ;; Whether `n` bytes at `a` and `b` are equal.
  (func $equal (param $a i32) (param $b i32) (param $n i32) (result i32)
    (local $i i32)
    (block $differ
      (loop $next
        (if (i32.ge_u (local.get $i) (local.get $n)) (then (return (i32.const 1))))
        (br_if $differ
          (i32.ne (i32.load8_u (i32.add (local.get $a) (local.get $i)))
                  (i32.load8_u (i32.add (local.get $b) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; The entry holding the key, or -1.
  (func $find (param $key i32) (param $len i32) (result i32)
    (local $i i32)
    (local $e i32)
    (loop $next
      (if (i32.ge_u (local.get $i) (global.get $slots)) (then (return (i32.const -1))))
      (local.set $e (call $entry (local.get $i)))
      (if (i32.and
            (i32.eq (i32.load (local.get $e)) (local.get $len))
            (call $equal (i32.add (local.get $e) (i32.const 8)) (local.get $key) (local.get $len)))
        (then (return (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next))
    (i32.const -1))

  ;; The first empty entry, or -1.
  (func $free (result i32)
    (local $i i32)
    (loop $next
      (if (i32.ge_u (local.get $i) (global.get $slots)) (then (return (i32.const -1))))
      (if (i32.eqz (i32.load (call $entry (local.get $i)))) (then (return (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next))
    (i32.const -1))

  ;; Position of the first space in [from, end), or end.
  (func $space (param $from i32) (param $end i32) (result i32)
    (loop $next
      (if (i32.ge_u (local.get $from) (local.get $end)) (then (return (local.get $end))))
      (if (i32.eq (i32.load8_u (local.get $from)) (i32.const 32)) (then (return (local.get $from))))
      (local.set $from (i32.add (local.get $from) (i32.const 1)))
      (br $next))
    (local.get $end))

  (func $set (param $key i32) (param $end i32) (result i64)
    (local $key_end i32)
    (local $key_len i32)
    (local $value i32)
    (local $value_len i32)
    (local $i i32)
    (local $e i32)
    (local.set $key_end (call $space (local.get $key) (local.get $end)))
    (local.set $key_len (i32.sub (local.get $key_end) (local.get $key)))
    (local.set $value (i32.add (local.get $key_end) (i32.const 1)))
    (if (i32.gt_u (local.get $value) (local.get $end)) (then (local.set $value (local.get $end))))
    (local.set $value_len (i32.sub (local.get $end) (local.get $value)))
    (if (i32.or (i32.or (i32.eqz (local.get $key_len)) (i32.gt_u (local.get $key_len) (i32.const 56)))
                (i32.gt_u (local.get $value_len) (i32.const 192)))
      (then (return (call $error (i32.const 64) (i32.const 21)))))
    (local.set $i (call $find (local.get $key) (local.get $key_len)))
    (if (i32.lt_s (local.get $i) (i32.const 0)) (then (local.set $i (call $free))))
    (if (i32.lt_s (local.get $i) (i32.const 0)) (then (return (call $error (i32.const 48) (i32.const 13)))))
    (local.set $e (call $entry (local.get $i)))
    (i32.store (local.get $e) (local.get $key_len))
    (i32.store offset=4 (local.get $e) (local.get $value_len))
    (memory.copy (i32.add (local.get $e) (i32.const 8)) (local.get $key) (local.get $key_len))
    (memory.copy (i32.add (local.get $e) (i32.const 64)) (local.get $value) (local.get $value_len))
    (call $pack (i32.const 16) (i32.const 2)))

  (func $get (param $key i32) (param $end i32) (result i64)
    (local $i i32)
    (local $e i32)
    (local.set $i (call $find (local.get $key) (i32.sub (local.get $end) (local.get $key))))
    (if (i32.lt_s (local.get $i) (i32.const 0)) (then (return (call $error (i32.const 32) (i32.const 11)))))
    (local.set $e (call $entry (local.get $i)))
    (call $pack (i32.add (local.get $e) (i32.const 64)) (i32.load offset=4 (local.get $e))))

  (func $del (param $key i32) (param $end i32) (result i64)
    (local $i i32)
    (local.set $i (call $find (local.get $key) (i32.sub (local.get $end) (local.get $key))))
    (if (i32.lt_s (local.get $i) (i32.const 0)) (then (return (call $error (i32.const 32) (i32.const 11)))))
    (i32.store (call $entry (local.get $i)) (i32.const 0))
    (call $pack (i32.const 16) (i32.const 2)))

  (func (export "solo_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $op i32)
    (local $end i32)
    (if (i32.lt_u (local.get $len) (i32.const 5))
      (then (return (call $error (i32.const 96) (i32.const 36)))))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    ;; The first four bytes as one little-endian word: "set ", "get " or "del ".
    (local.set $op (i32.load (local.get $ptr)))
    (if (i32.eq (local.get $op) (i32.const 0x20746573))
      (then (return (call $set (i32.add (local.get $ptr) (i32.const 4)) (local.get $end)))))
    (if (i32.eq (local.get $op) (i32.const 0x20746567))
      (then (return (call $get (i32.add (local.get $ptr) (i32.const 4)) (local.get $end)))))
    (if (i32.eq (local.get $op) (i32.const 0x206c6564))
      (then (return (call $del (i32.add (local.get $ptr) (i32.const 4)) (local.get $end)))))
    (call $error (i32.const 96) (i32.const 36))))
