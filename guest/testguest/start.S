/*
 * ftvm built-in test guest: entry point and interrupt stubs.
 *
 * Entered in 64-bit long mode at CPL0 with paging on (identity map of the
 * first 4 GiB), interrupts off, RDI = command line, RSI = memory size.
 * Only plain integer instructions are used here, plus cli/hlt and iretq.
 */

#define STACK_SIZE 16384

	.section .text.entry, "ax", @progbits
	.code64
	.globl _start
	.type _start, @function
_start:
	cli
	movq $stack_top, %rsp		/* our own stack, in .bss */
	movq %rdi, %r12			/* command line */
	movq %rsi, %r13			/* memory size */

	/* Zero .bss (8-byte aligned at both ends by link.ld). No stack use. */
	movq $__bss_start, %rdi
	movq $__bss_end, %rcx
	xorl %eax, %eax
1:	cmpq %rcx, %rdi
	jae 2f
	movq %rax, (%rdi)
	addq $8, %rdi
	jmp 1b
2:
	movq %r12, %rdi
	movq %r13, %rsi
	xorl %ebp, %ebp
	call kmain			/* rsp is 16-byte aligned here */
3:	cli
	hlt
	jmp 3b
	.size _start, . - _start

/*
 * 256 interrupt stubs, 16 bytes apart (idt.c relies on the stride). Each
 * pushes a dummy error code unless the CPU pushes one (vectors 8, 10-14,
 * 17, 21, 29, 30), then the vector number, and joins isr_common.
 */
	.text
	.balign 16
	.globl isr_stubs
	.type isr_stubs, @function
isr_stubs:
	.set vec, 0
	.rept 256
	.balign 16, 0x90
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr
	.size isr_stubs, . - isr_stubs

/*
 * Saves every general-purpose register (struct isr_frame in ftvm.h), calls
 * isr_dispatch(frame) and returns with iretq. The CPU aligned RSP to 16
 * before pushing its 5-word frame; with the error code, the vector and 15
 * registers that keeps RSP 16-byte aligned at the call.
 */
	.balign 16
	.type isr_common, @function
isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	cld
	call isr_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp			/* vector and error code */
	iretq
	.size isr_common, . - isr_common

	.section .bss
	.balign 16
	.globl stack_bottom, stack_top
stack_bottom:
	.skip STACK_SIZE
stack_top:

	.section .note.GNU-stack, "", @progbits
