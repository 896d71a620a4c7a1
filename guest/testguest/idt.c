/*
 * ftvm built-in test guest: the IDT and the C side of interrupt dispatch.
 *
 * All 256 vectors are interrupt gates (IF cleared on entry, DPL0: hardware
 * interrupts and exceptions ignore the gate's DPL, so they work from CPL3
 * too) pointing at the stubs in start.S: 0-31 are fatal exceptions, except
 * spin mode's planned #UD at CPL3 (spin_user_exit); 0x20 is the PIT tick,
 * 0x24 COM1, 0x27 and 0x2f the PICs' spurious vectors; anything else is
 * fatal.
 */
#include "ftvm.h"

#define KERNEL_CS 0x08		/* the VMM's 64-bit code selector */
#define GATE_INTERRUPT 0x8e	/* present, DPL0, 64-bit interrupt gate */
#define STUB_STRIDE 16		/* see start.S */

struct idt_entry {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_hi;
	u32 reserved;
} __attribute__((packed));

struct idt_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

extern const char isr_stubs[];

static struct idt_entry idt[256] __attribute__((aligned(16)));

void idt_init(void)
{
	struct idt_ptr p;
	u32 v;

	for (v = 0; v < ARRAY_LEN(idt); v++) {
		u64 a = (u64)isr_stubs + (u64)v * STUB_STRIDE;

		idt[v].offset_lo = (u16)a;
		idt[v].selector = KERNEL_CS;
		idt[v].ist = 0;
		idt[v].type_attr = GATE_INTERRUPT;
		idt[v].offset_mid = (u16)(a >> 16);
		idt[v].offset_hi = (u32)(a >> 32);
		idt[v].reserved = 0;
	}
	p.limit = sizeof(idt) - 1;
	p.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

static bool in_fatal;

/*
 * Interrupts are off (interrupt gate) and stay off: print with polled UART
 * output, after whatever was still queued, then exit the VM.
 */
__attribute__((noreturn)) static void fatal(const struct line *l, u8 status)
{
	if (!in_fatal) {
		in_fatal = true;
		uart_poll_flush_ring();
		uart_poll_line(l);
		uart_poll_wait_temt();
	}
	outb(status, DEBUG_EXIT_PORT);
	halt_forever();
}

void isr_dispatch(struct isr_frame *f)
{
	struct line l;

	switch (f->vector) {
	case VEC_TIMER:
		pit_irq();
		pic_eoi(0);
		return;
	case VEC_UART:
		uart_service();
		pic_eoi(4);
		return;
	case VEC_SPURIOUS_MASTER:
		pic_spurious(7);
		return;
	case VEC_SPURIOUS_SLAVE:
		pic_spurious(15);
		return;
	default:
		break;
	}
	if (spin_user_exit(f))
		return;

	line_reset(&l);
	if (f->vector < 32) {
		line_str(&l, "[fatal] exception ");
		line_dec(&l, f->vector, 0);
		line_str(&l, " error=0x");
		line_hex(&l, f->error, 0);
		line_str(&l, " rip=0x");
		line_hex(&l, f->rip, 16);
		if (f->cs & 3)
			line_str(&l, " cpl=3");
		line_ch(&l, '\n');
		fatal(&l, EXIT_EXCEPTION);
	}
	line_str(&l, "[fatal] unexpected vector ");
	line_dec(&l, f->vector, 0);
	line_ch(&l, '\n');
	fatal(&l, EXIT_BAD_VECTOR);
}
