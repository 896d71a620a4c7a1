/*
 * ftvm built-in test guest: entry point, interrupt stubs and the CPL3
 * entry/exit of spin mode.
 *
 * Entered in 64-bit long mode at CPL0 with paging on (identity map of the
 * first 4 GiB), interrupts off, RDI = command line, RSI = memory size.
 * Only plain integer instructions are used here, plus cli/hlt, iretq, and
 * the one ud2 of user_call's planned exit from CPL3.
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
 * registers that keeps RSP 16-byte aligned at the call. From CPL3 the CPU
 * first switches to the TSS's RSP0 (spin.c); the frame always holds SS:RSP,
 * so the same path returns to either CPL.
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

/*
 * void user_call(void (*fn)(struct spin_job *), struct spin_job *arg,
 *                u64 user_rsp)
 *
 * Runs fn(arg) at CPL3 (spin.c sets up the GDT, TSS and page tables
 * first). Saves the callee-saved registers, RFLAGS and RSP, then enters
 * user_entry at CPL3 with iretq (IF=1, IOPL=0). The user code ends in the
 * ud2 at user_exit_ud2, the only ud2 in the guest: the #UD handler
 * (spin_user_exit) turns its frame into one that returns to user_return at
 * CPL0 on the saved stack with the saved RFLAGS.
 */
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)

	.text
	.globl user_call
	.type user_call, @function
user_call:
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	pushfq
	popq user_saved_rflags
	movq %rsp, user_saved_rsp
	movq %rdi, %rax			/* fn */
	movq %rsi, %rdi			/* arg */
	pushq $USER_DS			/* SS */
	pushq %rdx			/* RSP (16-byte aligned) */
	pushq $0x202			/* RFLAGS: IF */
	pushq $USER_CS			/* CS */
	pushq $user_entry		/* RIP */
	iretq
user_entry:				/* CPL3 */
	call *%rax
	.globl user_exit_ud2
user_exit_ud2:
	ud2				/* the planned exit: #UD to CPL0 */
	.globl user_return
user_return:				/* CPL0 again, on the saved stack */
	movl $KERNEL_DS, %eax		/* iretq to CPL3 nulled these */
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %fs
	mov %eax, %gs
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	ret
	.size user_call, . - user_call

	.section .bss
	.balign 16
	.globl stack_bottom, stack_top
stack_bottom:
	.skip STACK_SIZE
stack_top:

	.section .note.GNU-stack, "", @progbits
