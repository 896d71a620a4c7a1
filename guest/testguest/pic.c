/*
 * ftvm built-in test guest: dual 8259A PIC, edge-triggered, vectors
 * 0x20-0x27 (master) and 0x28-0x2f (slave), slave cascaded on IRQ2.
 */
#include "ftvm.h"

#define ICW1_INIT 0x10
#define ICW1_ICW4 0x01
#define ICW4_8086 0x01
#define OCW2_EOI 0x20
#define OCW3_READ_ISR 0x0b

void pic_init(void)
{
	outb(ICW1_INIT | ICW1_ICW4, PIC1_CMD);	/* edge, cascade, ICW4 */
	outb(ICW1_INIT | ICW1_ICW4, PIC2_CMD);
	outb(VEC_PIC1_BASE, PIC1_DATA);		/* ICW2: vector bases */
	outb(VEC_PIC2_BASE, PIC2_DATA);
	outb(1 << 2, PIC1_DATA);		/* ICW3: slave on IRQ2 */
	outb(2, PIC2_DATA);			/* ICW3: slave identity 2 */
	outb(ICW4_8086, PIC1_DATA);		/* ICW4: 8086 mode */
	outb(ICW4_8086, PIC2_DATA);
	outb(0xff, PIC1_DATA);			/* OCW1: all masked for now */
	outb(0xff, PIC2_DATA);
}

/* Unmask IRQ0 (PIT), IRQ2 (cascade) and IRQ4 (COM1); the slave stays masked. */
void pic_unmask_used(void)
{
	outb((u8)~((1 << 0) | (1 << 2) | (1 << 4)), PIC1_DATA);
}

void pic_eoi(u32 irq)
{
	if (irq >= 8)
		outb(OCW2_EOI, PIC2_CMD);
	outb(OCW2_EOI, PIC1_CMD);
}

void pic_spurious(u32 irq)
{
	u16 cmd = irq >= 8 ? PIC2_CMD : PIC1_CMD;
	u8 isr;

	outb(OCW3_READ_ISR, cmd);
	isr = inb(cmd);
	if (isr & 0x80) {
		/* A real IRQ7/IRQ15 (masked here, but be correct). */
		pic_eoi(irq);
	} else if (irq >= 8) {
		/* Spurious on the slave: the master did see a real IRQ2. */
		outb(OCW2_EOI, PIC1_CMD);
	}
}
