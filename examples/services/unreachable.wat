;; crasher: traps on every call with the `unreachable` instruction.
(module
  (memory (export "memory") 1)
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param i32 i32) (result i64) unreachable))
