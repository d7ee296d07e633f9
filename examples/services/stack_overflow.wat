;; crasher: recurses without end; the wasm stack limit turns it into a `stack_overflow` trap.
(module
  (memory (export "memory") 1)
  (func $deeper (param $n i64) (result i64)
    (i64.add (call $deeper (i64.add (local.get $n) (i64.const 1))) (i64.const 1)))
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param i32 i32) (result i64)
    (call $deeper (i64.const 0))))
