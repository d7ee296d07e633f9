;; crasher: grows its memory by 1 MiB per step until the host refuses, then traps. The trap is
;; reported as a `memory_limit` crash.
(module
  (memory (export "memory") 1)
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param i32 i32) (result i64)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))
