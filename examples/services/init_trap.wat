;; crasher: traps in `solo_init`, so it never starts: the service is `failed` until redeployed.
(module
  (memory (export "memory") 1)
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0))
  (func (export "solo_init") (result i32) unreachable))
