;; echo: answers every request with the request itself.
;;
;; The smallest complete service of the guest ABI (docs/service-abi.md): it exports its memory,
;; an allocator and a handler, logs a line when it starts and when it stops.
(module
  (import "solo" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "echo ready")
  (data (i32.const 32) "echo stopping")

  ;; Requests live at offset 1024; each call reuses the same buffer.
  (global $buffer i32 (i32.const 1024))

  ;; Returns room for `len` bytes, growing memory if needed.
  (func (export "solo_alloc") (param $len i32) (result i32)
    (local $pages i32)
    (local.set $pages
      (i32.shr_u (i32.add (i32.add (global.get $buffer) (local.get $len)) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable))))
    (global.get $buffer))

  ;; The response is the request: same place, same length.
  (func (export "solo_handle") (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len))))

  (func (export "solo_init") (result i32)
    (call $log (i32.const 2) (i32.const 16) (i32.const 10))
    (i32.const 0))

  (func (export "solo_stop")
    (call $log (i32.const 2) (i32.const 32) (i32.const 13))))
